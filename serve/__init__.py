"""How a model ANSWERS: generation (the paged engine arrives with the serving issue)."""
