"""An MoE model with its experts split over the mesh's `expert` axis computes what one device computes."""

import jax
import pytest

from model.config import MoEConfig
from model.presets import get_preset
from parallel.mesh import parse_mesh
from tests.parallel.mesh_grads import assert_mesh_matches_one_device

MOE = get_preset("tiny").replace(dtype="float32", moe=MoEConfig(n_experts=8, top_k=2, capacity_factor=1.0))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", ["fsdp=2,expert=2,tensor=2"])
def test_moe_model_on_an_expert_mesh_matches_one_device(mesh_text):
    """Loss, router loss and every gradient (experts' and router's included); capacity 1.0 drops tokens, so
    the groups (sequences) must be dispatched exactly as on one device."""
    tokens = jax.random.randint(jax.random.key(7), (8, 17), 0, MOE.vocab_size)
    _, terms_ref, hlo = assert_mesh_matches_one_device(MOE, tokens, mesh_text, terms=("router_loss",), with_hlo=True)
    assert terms_ref["router_loss"] > 0
    assert "all-to-all" in hlo  # tokens travel to their experts' devices, not the experts to the tokens


def test_expert_mesh_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"model.moe.n_experts \(8\) must be divisible by mesh.expert \(3\)"):
        parse_mesh("expert=3").validate_for(MOE, micro_batch=6)
    dropless = MOE.replace(moe=MoEConfig(n_experts=8, dispatch="dropless"))  # expert parallel: tests/parallel/
    with pytest.raises(ValueError, match="'dropless' with mesh.expert=2 and mesh.stage=2"):  # test_expert_dropless
        parse_mesh("expert=2,stage=2").validate_for(dropless, micro_batch=4)
