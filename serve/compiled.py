"""Functions compiled ahead of time once per shape of their arguments and shared by every engine of one model
structure: the engine's step, a draft model's or head's catch-up and drafting. A benchmark's baseline, a restarted
server and the next test reuse the first one's executables; each counts its shapes and the seconds spent tracing and
compiling them (the engine's `compiles()`, its warm-up and its benchmarks read them)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax

from model.kernels.triton import triton_deprecation_ignored


class CompiledPerShape:
    """`fn` jitted with `donate` donated, lowered and compiled once per shapes and dtypes of its arguments. The first
    argument is the weights: their many leaves are read once per weights object, not at every call (a host step of a
    small model is shorter than flattening its weights)."""

    def __init__(self, fn: Callable, donate: tuple[int, ...] = (1,)):
        self._jitted = jax.jit(fn, donate_argnums=donate)
        self._compiled: dict[tuple, Callable] = {}
        self._weights: tuple[object, tuple] = (None, ())  # the last weights seen and their shapes
        self.compile_s = 0.0

    @staticmethod
    def _shapes(tree: object) -> tuple:
        leaves, structure = jax.tree.flatten(tree)
        return (structure, *((a.shape, a.dtype) for a in leaves))

    def _key(self, args: tuple) -> tuple:
        if args[0] is not self._weights[0]:
            self._weights = (args[0], self._shapes(args[0]))
        return self._weights[1] + self._shapes(args[1:])

    def compiled(self, *args: object) -> bool:
        """Whether the call with these arguments' shapes is compiled already."""
        return self._key(args) in self._compiled

    def __call__(self, *args: object) -> tuple:
        key = self._key(args)
        fn = self._compiled.get(key)
        if fn is None:
            start = time.perf_counter()
            with triton_deprecation_ignored():
                fn = self._jitted.lower(*args).compile()
            self.compile_s += time.perf_counter() - start
            self._compiled[key] = fn
        return fn(*args)

    def cost(self, *args: object) -> dict:
        """XLA's cost analysis (flops, bytes accessed) of the call for these arguments' shapes."""
        with triton_deprecation_ignored():
            return self._jitted.lower(*args).compile().cost_analysis()

    @property
    def count(self) -> int:
        return len(self._compiled)


@functools.cache
def shared_compiled(fn: Callable, *static: object, donate: tuple[int, ...] = (1,)) -> CompiledPerShape:
    """The shared `CompiledPerShape` of `fn` with its leading `static` arguments bound (the model's graph and the
    like: they and `fn` are the key)."""
    return CompiledPerShape(functools.partial(fn, *static), donate)
