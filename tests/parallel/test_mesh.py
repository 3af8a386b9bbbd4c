"""MeshConfig validation, mesh-string parsing, mesh device order, and the logical-axis rule table."""

import dataclasses

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import axes
from model.presets import PRESETS
from parallel.mesh import MESH_AXES, MeshConfig, make_mesh, parse_mesh
from parallel.rules import LOGICAL_NAMES, activation_rules, logical_to_spec, rules_for

TINY = PRESETS["tiny"]  # n_heads 4, n_kv_heads 2, d_ff 192


def test_resolve_fills_the_rest():
    assert MeshConfig(data=-1, tensor=2).resolve(8) == MeshConfig(data=4, tensor=2)
    assert MeshConfig(fsdp=8).resolve(8).fsdp == 8


def test_product_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"multiply to 4 .* 8 devices"):
        MeshConfig(data=2, tensor=2).resolve(8)
    with pytest.raises(ValueError, match=r"multiply to 3.* 8 devices"):
        MeshConfig(data=-1, tensor=3).resolve(8)


def test_minus_one_twice_and_bad_sizes():
    with pytest.raises(ValueError, match=r"only one mesh axis may be -1.*data, fsdp"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"mesh.tensor must be .* got 0"):
        MeshConfig(tensor=0)
    with pytest.raises(ValueError, match=r"mesh.data must be .* got -2"):
        MeshConfig(data=-2)


def test_validate_for_names_both_numbers():
    MeshConfig(data=4, tensor=2).validate_for(TINY, micro_batch=8, seq_len=64)
    with pytest.raises(ValueError, match=r"model.n_kv_heads \(2\) must be divisible by mesh.tensor \(4\)"):
        MeshConfig(data=2, tensor=4).validate_for(TINY, micro_batch=8)
    with pytest.raises(ValueError, match=r"model.n_heads \(4\) must be divisible by mesh.tensor \(8\)"):
        MeshConfig(tensor=8).validate_for(dataclasses.replace(TINY, n_kv_heads=4), micro_batch=8)
    with pytest.raises(ValueError, match=r"model.d_ff \(189\) must be divisible by mesh.tensor \(2\)"):
        MeshConfig(data=4, tensor=2).validate_for(dataclasses.replace(TINY, d_ff=189), micro_batch=8)
    with pytest.raises(ValueError, match=r"micro-step \(6 sequences.*mesh.data \* mesh.fsdp \* mesh.expert \(4\)"):
        MeshConfig(data=2, fsdp=2, tensor=2).validate_for(TINY, micro_batch=6)
    with pytest.raises(ValueError, match=r"vocab_size \(259\) must be divisible by mesh.tensor \(2\)"):
        MeshConfig(data=4, tensor=2, vocab_parallel=True).validate_for(TINY, micro_batch=8)
    with pytest.raises(ValueError, match=r"seq_len \(30\) must be divisible by mesh.sequence \(4\)"):
        MeshConfig(data=2, sequence=4).validate_for(TINY, micro_batch=8, seq_len=30)
    MeshConfig(data=4, stage=2).validate_for(TINY, micro_batch=8)  # errors: test_pipeline.py


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=2,tensor=2") == MeshConfig(data=2, fsdp=2, tensor=2)
    assert parse_mesh(" fsdp = -1 ") == MeshConfig(fsdp=-1)
    for text, message in [("data2", r"'data2' is not of the form axis=size"),
                          ("data=2,model=4", r"'model=4': unknown axis 'model'"),
                          ("tensor=two", r"'tensor=two': size 'two' is not an integer"),
                          ("data=2,data=4", r"'data=4': axis 'data' given twice"),
                          ("data=0", r"mesh.data must be")]:
        with pytest.raises(ValueError, match=message):
            parse_mesh(text)


def test_mesh_axis_order_puts_tensor_innermost():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "stage": 1, "expert": 1, "sequence": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 2, 2)
    assert (ids[..., 1] - ids[..., 0] == 1).all()  # tensor neighbours are consecutive devices
    assert ids[1, 0, 0] - ids[0, 0, 0] == 4        # data is outermost
    # Auto axes: GSPMD propagation from with_sharding_constraint, not explicit sharding-in-types.
    assert all(str(t).endswith("Auto") for t in mesh.axis_types)


def test_rules_drop_size_one_axes():
    rules = rules_for(MeshConfig(data=8))
    assert logical_to_spec((axes.BATCH, axes.LENGTH, axes.EMBED), rules) == P("data", None, None)
    assert logical_to_spec((axes.EMBED, axes.MLP), rules) == P(None, None)
    mentioned = {a for _, mesh_axes in rules for a in mesh_axes}
    assert mentioned == {"data"}
    rules = rules_for(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec((axes.LAYERS, axes.EMBED, axes.MLP), rules) == P(None, "fsdp", "tensor")
    assert logical_to_spec((axes.VOCAB, axes.EMBED), rules) == P(None, "fsdp")
    vocab_rules = rules_for(MeshConfig(data=2, fsdp=2, tensor=2), vocab_parallel=True)
    assert logical_to_spec((axes.VOCAB, axes.EMBED), vocab_rules) == P("tensor", "fsdp")


def _spec_axes(spec):
    out = []
    for entry in spec:
        out.extend(() if entry is None else (entry,) if isinstance(entry, str) else entry)
    return out


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "fsdp=8", "fsdp=2,sequence=2,tensor=2",
                                  "data=2,fsdp=2,expert=2"])
def test_no_mesh_axis_twice_in_a_spec(mesh):
    rules = rules_for(parse_mesh(mesh), vocab_parallel=True)
    activations = [(axes.BATCH, axes.LENGTH, axes.EMBED), (axes.BATCH, axes.LENGTH, axes.MLP),
                   (axes.BATCH, axes.LENGTH, axes.HEADS, None), (axes.BATCH, axes.LENGTH, axes.VOCAB)]
    params = [(axes.LAYERS, axes.EMBED, axes.HEADS, axes.HEAD_DIM), (axes.VOCAB, axes.EMBED),
              (axes.EMBED, axes.EMBED), (axes.EXPERT, axes.EMBED, axes.MLP), (axes.BATCH, axes.EMBED, axes.EXPERT)]
    for names in activations + params:
        used = _spec_axes(logical_to_spec(names, rules))
        assert len(used) == len(set(used)), (names, used)
    # The flat activation rules used by flax's context agree with per-array resolution on activations.
    flat = dict(activation_rules(rules))
    assert set(flat) == set(LOGICAL_NAMES)
    for names in activations:
        spec = logical_to_spec(names, rules)
        assert tuple(spec) == tuple(flat[n] if n else None for n in names)
    # Activations never put fsdp on embed; weights do (when fsdp > 1).
    assert logical_to_spec((axes.BATCH, axes.LENGTH, axes.EMBED), rules)[2] is None
    assert ("fsdp" in _spec_axes(logical_to_spec((axes.EMBED, axes.MLP), rules))) == ("fsdp" in mesh)
