"""Inputs a new user tries first: a wrong width, an empty batch, `model.export()`."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe.registry import GATING_TYPES
from tests.layer_checks import BACKEND

# Router-specific fields a router needs to be built (everything else: defaults).
ROUTER_FIELDS = {"ensemble": {"ensemble_members": [{"gating_type": "linear"}, {"gating_type": "top_p"}]}}
# One router per routing kind.
KIND_ROUTERS = {"token_choice": "linear", "expert_choice": "expert_choice", "soft": "softmoe"}


def make_moe(gating_type, drop_tokens=True, **overrides):
    top_k = 1 if gating_type in ("softmoe", "expert_choice") else 2
    return dl_moe.create_ffn_moe(
        4, 8, top_k=top_k, gating_type=gating_type, intermediate_size=8, drop_tokens=drop_tokens,
        **{**ROUTER_FIELDS.get(gating_type, {}), **overrides},
    )


def test_a_wrong_width_after_build_is_a_keras_value_error():
    layer = make_moe("linear")
    layer(np.zeros((2, 8), "float32"))
    with pytest.raises(ValueError, match=r"expected axis -1 of input shape to have value 8.*\(2, 9\)"):
        layer(np.zeros((2, 9), "float32"))


def test_a_wrong_rank_for_attention_experts_is_a_keras_value_error():
    layer = dl_moe.create_attention_moe(num_experts=2, hidden_dim=8, num_heads=2)
    layer(np.zeros((2, 3, 8), "float32"))
    with pytest.raises(ValueError, match=r"expected ndim=3, found ndim=2"):
        layer(np.zeros((6, 8), "float32"))


@pytest.mark.parametrize("kind", sorted(KIND_ROUTERS))
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "dropless"])
def test_an_empty_batch_gives_an_empty_output(kind, drop_tokens):
    layer = make_moe(KIND_ROUTERS[kind], drop_tokens=drop_tokens, output_dim=6)
    layer(np.ones((2, 5, 8), "float32"))  # built on a real batch
    for shape in [(0, 8), (0, 5, 8), (2, 0, 8)]:
        for training in (False, True):
            out = layer(np.zeros(shape, "float32"), training=training)
            assert tuple(out.shape) == shape[:-1] + (6,), (shape, training)
    # An unbuilt layer whose first batch is empty builds and answers the same way.
    assert tuple(make_moe(KIND_ROUTERS[kind], drop_tokens=drop_tokens)(np.zeros((0, 8), "float32")).shape) == (0, 8)


@pytest.mark.skipif(BACKEND == "torch", reason="tf_saved_model export with a symbolic batch axis: TensorFlow and JAX only")
def test_export_with_a_symbolic_batch_serves_the_same_outputs(tmp_path):
    """Every router (capacity and dropless modes alternating) in one exported model."""
    tf = pytest.importorskip("tensorflow")
    inputs = keras.Input((5, 8))
    branches = [
        make_moe(gating_type, drop_tokens=index % 2 == 0)(inputs)
        for index, gating_type in enumerate(GATING_TYPES.names())
    ]
    branches.append(make_moe("linear", drop_tokens=False, hierarchical_routing=True, num_shared_experts=1)(inputs))
    # Three routing levels (2 x 2 x 1 over the 4 experts, a beam of 2 groups per level).
    branches.append(make_moe("linear", hierarchical_routing=True, num_routing_levels=3, top_k_groups=2)(inputs))
    model = keras.Model(inputs, keras.layers.Concatenate()(branches))
    path = os.path.join(tmp_path, "served")
    model.export(path, format="tf_saved_model", verbose=False)
    artifact = tf.saved_model.load(path)
    for batch in (1, 3):  # capacity depends on the batch: each size is its own check
        x = np.random.default_rng(batch).normal(size=(batch, 5, 8)).astype("float32")
        served = artifact.serve(tf.constant(x)).numpy()
        np.testing.assert_allclose(served, ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5)
