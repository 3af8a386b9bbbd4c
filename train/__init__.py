"""How a model LEARNS: tokenizer, data, optimizer, train step, evaluation, checkpoints, metrics."""
