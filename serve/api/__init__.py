"""The OpenAI-compatible HTTP server on the engine: request parsing and checks (protocol.py), the engine in its own
thread (async_engine.py), one request's choices as text and response objects (generation.py), Prometheus metrics
(metrics.py) and the FastAPI routes (app.py). `scripts/serve.py` loads a model and its tokenizer and runs the app."""
