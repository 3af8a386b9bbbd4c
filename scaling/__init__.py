"""What a model COSTS: parameter and FLOP accounting (laws and sweeps arrive with the scaling issue)."""
