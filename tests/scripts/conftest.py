"""Commands run by these tests keep JAX's persistent compilation cache in a temporary folder, never in the real
home (scripts.generate and scripts.bench_serving turn the cache on by default; $MESHLM_COMPILATION_CACHE moves it,
for the commands run in this process and for the child processes they start)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def compilation_cache_in_a_temporary_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHLM_COMPILATION_CACHE", str(tmp_path_factory.mktemp("jax-compilation-cache")))
        yield
