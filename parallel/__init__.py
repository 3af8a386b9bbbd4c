"""How a model is SPREAD over devices: meshes, logical-axis rules, sharding (see DESIGN.md; arrives with the sharding issue)."""
