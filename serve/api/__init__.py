"""The OpenAI-compatible HTTP server on the engine: request parsing and checks (protocol.py), the engine in its own
thread (async_engine.py), the text of a choice as it streams (text_output.py), Prometheus metrics (metrics.py)
and the FastAPI routes (app.py). `scripts/serve.py` loads a model and its tokenizer and runs the app."""
