"""The packages' seams at run time, in fresh interpreters (the static side is `lint-imports`, pyproject.toml):
every module imports when it is the first of ours to be imported (an import cycle fails exactly then), and the
light modules (model.config, scaling.accounting) load no kernel, no layer and nothing of parallel/, train/,
serve/ or flax."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.subprocesses import ROOT, child_env, tail

PACKAGES = ("model", "parallel", "train", "serve", "scaling", "scripts")


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter from the repository root; its stdout (the test fails on an error)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, tail(done.stderr)
    return done.stdout


# One interpreter for all modules: the third-party libraries stay loaded, and before each module every module of
# ours is dropped from sys.modules, so that module is imported first among ours, as in a fresh interpreter.
EACH_MODULE_FIRST = """
import importlib, json, pkgutil, sys, traceback
import jax, numpy, optax, flax.nnx, orbax.checkpoint  # noqa: F401  (loaded once, kept)
packages = {packages!r}
names = []
for package in packages:
    names.append(package)
    names += [m.name for m in pkgutil.walk_packages([package], prefix=package + ".")]
failures = {{}}
for name in names:
    for loaded in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps({{"modules": names, "failures": failures}}))
"""


def test_every_module_imports_first():
    result = json.loads(run_python(EACH_MODULE_FIRST.format(packages=PACKAGES)).splitlines()[-1])
    assert len(result["modules"]) > 40  # the walk found the packages
    assert "parallel.pipeline" in result["modules"] and "model.transformer" in result["modules"]
    assert result["failures"] == {}, "\n".join(f"{name}:\n{error}" for name, error in result["failures"].items())


@pytest.mark.parametrize("module", ["model.config", "scaling.accounting"])
def test_light_modules_load_no_kernel_and_nothing_of_parallel(module):
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('model', 'parallel', 'train', 'serve', 'scaling', 'scripts', 'flax'))))")
    loaded = json.loads(run_python(code).splitlines()[-1])
    assert module in loaded
    heavy = [m for m in loaded if m.startswith(("model.kernels", "model.attention", "model.layers", "model.moe",
                                                "model.transformer", "parallel", "train", "serve", "flax"))]
    assert heavy == []
