"""What a model COSTS and what it WILL DO: parameter, FLOP, memory and communication accounting, device peaks,
loss-law fitting, compute-optimal design, and the sweep launcher."""
