"""How a model is SPREAD over devices: meshes (`mesh`), the logical-axis rule table (`rules`) and sharded
parameters, optimizer state and train steps (`sharding`)."""
