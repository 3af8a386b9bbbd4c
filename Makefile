# make demo | make test | make bench — each creates .venv and installs meshlm into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

# The CPU demo: the `small` preset on the standard-library corpus, tuned to finish in a few minutes on 2 cores
# (docs/BENCHMARKS.md has its time and validation bits per byte).
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --preset small --steps 640 --set train.batch_size=16 --set train.seq_len=256 --set train.lr=5e-3 \
             --set train.warmup_steps=50 --set train.eval_every=320 --set train.ckpt_every=320 --set train.eval_batches=16

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev,hf,plot]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m scripts.train $(DEMO_ARGS) --out $(DEMO_OUT)
	$(BIN)/python -m scripts.generate --run $(DEMO_OUT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python -m scripts.bench_train --preset small
	$(BIN)/python -m scripts.bench_laws

clean:
	rm -rf $(VENV) runs .pytest_cache
