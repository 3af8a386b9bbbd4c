"""How a model is SPREAD over devices: the mesh and its config (`mesh`), the logical-axis rule table (`rules`),
the model's plan on a mesh (`sharding`: the model built with the mesh's attention and layer stack, parameter,
optimizer-state and batch shardings, `MeshFunction`), the attention kernels run per device (`attention`,
`ring_attention`, `ulysses`), the GPipe layer stack (`pipeline`), multi-process start-up (`distributed`,
`launch`) and reading what a compiled step communicates (`hlo`, `explain`)."""
