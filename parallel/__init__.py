"""How a model is SPREAD over devices: meshes, logical-axis rules, sharding (arrives with the sharding issue)."""
