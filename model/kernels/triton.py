"""What every Pallas kernel of ours needs to target Triton on NVIDIA GPUs: compiler params (which also select the
Triton lowering: JAX 0.11's default on GPU is Mosaic GPU, which our kernels' gathers and loops do not target) and
a filter for JAX 0.11's "Pallas Triton backend is deprecated" warning, emitted at every lowering."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def triton_deprecation_ignored() -> Iterator[None]:
    """Silence exactly the Triton-deprecation warning. Wrap the place where a kernel is lowered: the call itself
    when it runs eagerly, the outer `jit`'s first call (or `.lower()`) when the kernel is traced inside one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*\bTriton\b.*\bdeprecated\b")
        yield


def compiler_params(num_warps: int, num_stages: int) -> object:
    """Triton compiler params for `pallas_call`. Imported here, inside the warning filter, in case the import
    warns."""
    with triton_deprecation_ignored():
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
