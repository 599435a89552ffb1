"""`dl_moe.integrations.keras_hub`: sparsified keras-hub MoE models against the stock ones.

Each family gets one tiny random CausalLM built from constructor arguments (no presets,
no downloads) and a second one with the same weights that is sparsified; the tests
compare the two. Real tokens are compared everywhere; padded positions are not, since
the sparse blocks output zeros for them (a stock block computes them, and attention
never reads them).
"""

import os

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
from keras import ops  # noqa: E402

from dl_moe.callbacks import RoutingMonitor  # noqa: E402
from dl_moe.integrations import keras_hub as integration  # noqa: E402
from dl_moe.layer import MixtureOfExperts  # noqa: E402

VOCAB = 64
BATCH, SEQ = 2, 8
TOLERANCE = 1e-5

# Family → (backbone class, CausalLM class, constructor arguments, aux-loss coefficient).
FAMILIES = {
    "mixtral": (
        keras_hub.models.MixtralBackbone,
        keras_hub.models.MixtralCausalLM,
        dict(num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, num_experts=4, top_k=2,
             sliding_window=8, router_aux_loss_coef=0.05),
    ),
    "qwen3_moe": (
        keras_hub.models.Qwen3MoeBackbone,
        keras_hub.models.Qwen3MoeCausalLM,
        dict(num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, moe_intermediate_dim=24,
             num_experts=4, top_k=2, head_dim=4, norm_top_k_prob=False, router_aux_loss_coefficient=0.05),
    ),
    "qwen_moe": (
        keras_hub.models.QwenMoeBackbone,
        keras_hub.models.QwenMoeCausalLM,
        dict(num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, moe_intermediate_dim=24,
             shared_expert_intermediate_dim=40, num_experts=4, top_k=2, norm_top_k_prob=True,
             router_aux_loss_coefficient=0.05),
    ),
    "qwen3_5_moe": (
        keras_hub.models.Qwen3_5MoeBackbone,
        keras_hub.models.Qwen3_5MoeCausalLM,
        dict(num_query_heads=4, num_key_value_heads=2, head_dim=8, hidden_dim=16, moe_intermediate_dim=24,
             shared_expert_intermediate_size=40, num_experts=4, top_k=2,
             # Full attention only: the MoE blocks are the same after a GatedDeltaNet layer,
             # which is slow in eager mode.
             layer_types=["full_attention"], router_aux_loss_coefficient=0.05),
    ),
    "gpt_oss": (
        keras_hub.models.GptOssBackbone,
        keras_hub.models.GptOssCausalLM,
        dict(num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=24, num_experts=4, top_k=2,
             head_dim=4, sliding_window=8),
    ),
    "gemma4": (
        keras_hub.models.Gemma4Backbone,
        keras_hub.models.Gemma4CausalLM,
        dict(image_size=16, num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, head_dim=8,
             sliding_window_size=8, enable_moe_block=True, num_experts=4, expert_intermediate_dim=24,
             num_experts_per_token=2),
    ),
}
# Mixtral gets two decoder layers (several MoE layers in one model); the others one,
# which halves their cost.
NUM_LAYERS = {"mixtral": 2}
# keras-hub's GPT-OSS and Gemma 4 blocks add no balancing loss (so neither do their adapters).
HAS_AUX_LOSS = {"mixtral", "qwen3_moe", "qwen_moe", "qwen3_5_moe"}


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def make_inputs(family, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, VOCAB, size=(BATCH, SEQ)).astype("int32")
    padding_mask = np.ones((BATCH, SEQ), dtype=bool)
    padding_mask[1, 5:] = False  # a right-padded sequence
    token_ids[~padding_mask] = 0
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if family == "gemma4":  # Gemma 4's backbone takes explicit positions
        inputs["position_ids"] = np.tile(np.arange(SEQ, dtype="int32"), (BATCH, 1))
    return inputs


def build_pair(family):
    """(stock CausalLM, sparsified CausalLM with the same weights)."""
    backbone_cls, causal_lm_cls, kwargs = FAMILIES[family]
    keras.utils.set_random_seed(0)
    num_layers = NUM_LAYERS.get(family, 1)
    stock_backbone = backbone_cls(vocabulary_size=VOCAB, num_layers=num_layers, **kwargs)
    # Router kernels of keras-hub's initializers are tiny; spread the routing so that
    # every expert is used and a wrong assignment shows in the outputs.
    # Vectors (biases, scales) get non-zero values too, so that their mapping is tested.
    rng = np.random.default_rng(1)
    for variable in stock_backbone.trainable_weights:
        loc = 0.5 if len(variable.shape) == 1 else 0.0
        variable.assign(rng.normal(loc, 0.3, size=variable.shape).astype("float32"))
    stock = causal_lm_cls(backbone=stock_backbone, preprocessor=None)
    # From the constructor arguments: some keras-hub configs drop the balancing
    # coefficient (QwenMoeBackbone's), so `from_config` would not be the same model.
    twin_backbone = backbone_cls(vocabulary_size=VOCAB, num_layers=num_layers, **kwargs)
    twin_backbone.set_weights(stock_backbone.get_weights())
    sparse = integration.sparsify(causal_lm_cls(backbone=twin_backbone, preprocessor=None))
    return stock, sparse


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    return (request.param,) + build_pair(request.param)


def test_sparsify_replaces_every_moe_block_by_type(pair):
    family, stock, sparse = pair
    assert integration.is_sparsified(sparse) and not integration.is_sparsified(stock)
    layers = integration.moe_layers(sparse)
    assert [layer.name for layer in layers] == [f"{d.name}_moe" for d in sparse.backbone.transformer_layers]
    assert all(isinstance(layer, MixtureOfExperts) for layer in layers)
    assert all(not layer.config.drop_tokens for layer in layers)  # dropless by default
    stock_block_cls = integration._FAMILIES[type(stock.backbone)].stock_block_class
    assert not integration._find_blocks(sparse.backbone, (stock_block_cls,))


def test_backbone_and_logits_equal_stock(pair):
    family, stock, sparse = pair
    inputs = make_inputs(family)
    real = inputs["padding_mask"]
    hidden = ops.convert_to_numpy(sparse.backbone(inputs))
    expected_hidden = ops.convert_to_numpy(stock.backbone(inputs))
    assert relative_error(hidden[real], expected_hidden[real]) < TOLERANCE
    logits = ops.convert_to_numpy(sparse(inputs))
    expected_logits = ops.convert_to_numpy(stock(inputs))
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert relative_error(logits[real], expected_logits[real]) < TOLERANCE


def moe_losses(model, inputs):
    model.backbone(inputs, training=True)
    return [float(ops.convert_to_numpy(loss)) for loss in model.backbone.losses]


def test_training_adds_the_stock_balancing_loss(pair):
    family, stock, sparse = pair
    inputs = make_inputs(family, 1)
    expected = moe_losses(stock, inputs)
    losses = moe_losses(sparse, inputs)
    if family not in HAS_AUX_LOSS:
        assert expected == [] and losses == []
        return
    assert len(expected) == len(losses) == NUM_LAYERS.get(family, 1)  # one per MoE layer
    np.testing.assert_allclose(sorted(losses), sorted(expected), rtol=1e-5)
    assert min(losses) > 0.0


def greedy_without_cache(model, prompt, prompt_length):
    """Greedy decoding by full forward passes (no cache): the reference for generate()."""
    inputs = {k: np.array(v) for k, v in prompt.items()}
    for position in range(prompt_length, SEQ):
        inputs["padding_mask"][:, :position] = True
        logits = ops.convert_to_numpy(model(inputs))
        inputs["token_ids"][:, position] = np.argmax(logits[:, position - 1], axis=-1)
    return inputs["token_ids"]


def test_greedy_generate_gives_the_stock_tokens(pair):
    family, stock, sparse = pair
    prompt_length = 3
    prompt = make_inputs(family, 2)
    prompt["padding_mask"][:, prompt_length:] = False  # 3 prompt tokens, 5 generated
    prompt["token_ids"][:, prompt_length:] = 0
    expected = greedy_without_cache(stock, prompt, prompt_length)
    sparse.compile(sampler="greedy")
    generated = sparse.generate(dict(prompt), stop_token_ids=None)  # cached decoding, compiled on TF/JAX
    np.testing.assert_array_equal(ops.convert_to_numpy(generated["token_ids"]), expected)
    assert np.all(ops.convert_to_numpy(generated["padding_mask"]))


def test_keras_round_trip_and_weights_back_to_stock(pair, tmp_path):
    family, stock, sparse = pair
    inputs = make_inputs(family, 3)
    real = inputs["padding_mask"]
    expected = ops.convert_to_numpy(sparse(inputs))
    path = os.path.join(tmp_path, "sparse.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert integration.is_sparsified(loaded)
    coefficient = FAMILIES[family][2].get("router_aux_loss_coef", FAMILIES[family][2].get("router_aux_loss_coefficient", 0.0))
    assert loaded.backbone.get_config()["dl_moe_overrides"] == {"aux_loss_weight": coefficient}
    assert integration.moe_layers(loaded)[0].config.gating_config.aux_loss_weight == coefficient
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(inputs)), expected)

    back = integration.unsparsify(loaded)
    assert type(back) is type(stock) and type(back.backbone) is type(stock.backbone)
    assert relative_error(ops.convert_to_numpy(back(inputs))[real], ops.convert_to_numpy(stock(inputs))[real]) < TOLERANCE
    # Stock keras-hub reads the weights back: the preset files of the stock model.
    preset = os.path.join(tmp_path, "preset")
    back.backbone.save_to_preset(preset)
    reloaded = keras_hub.models.Backbone.from_preset(preset)
    assert type(reloaded) is type(stock.backbone)
    for a, b in zip(reloaded.weights, stock.backbone.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_fit_lowers_the_loss_and_reports_routing(pair):
    family, stock, sparse = pair
    # A separate copy: training must not change the weights other tests compare.
    model = type(sparse)(backbone=type(sparse.backbone).from_config(sparse.backbone.get_config()), preprocessor=None)
    model.set_weights(sparse.get_weights())
    # Compiled training (XLA on JAX, tf.function on TF); on TF the other families train
    # eagerly, the same layer code at a fraction of the tracing time.
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=family != "mixtral" and keras.backend.backend() == "tensorflow",
    )
    inputs = make_inputs(family, 4)
    x = {k: np.tile(v, (2, 1)) for k, v in inputs.items()}
    y = np.roll(x["token_ids"], -1, axis=1)
    monitor = RoutingMonitor()
    history = model.fit(x, y, sample_weight=x["padding_mask"].astype("float32"), batch_size=4, epochs=4, verbose=0,
                        callbacks=[monitor])
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    for name in [f"{d.name}_moe" for d in model.backbone.transformer_layers]:
        assert history.history[f"{name}_avg_experts"][-1] == pytest.approx(2.0)
        assert history.history[f"{name}_dropped"][-1] == 0.0
        assert monitor.expert_fractions[name][-1].shape == (4,)


def test_overrides_reach_the_layers_and_survive_saving(tmp_path):
    stock, _ = build_pair("mixtral")
    model = integration.sparsify(stock, drop_tokens=True, train_capacity_factor=1.25, z_loss_weight=1e-3)
    layer = integration.moe_layers(model)[0]
    assert layer.config.drop_tokens and layer.config.train_capacity_factor == 1.25
    assert layer.config.gating_config.z_loss_weight == 1e-3
    assert layer.config.gating_config.aux_loss_weight == 0.05  # the model's own coefficient
    path = os.path.join(tmp_path, "capacity.keras")
    model.backbone.save(path)
    loaded = keras.models.load_model(path)
    assert integration.moe_layers(loaded)[0].config.to_dict() == layer.config.to_dict()


def test_bad_models_and_overrides_raise():
    stock, sparse = build_pair("mixtral")
    with pytest.raises(ValueError, match="already sparsified"):
        integration.sparsify(sparse)
    with pytest.raises(ValueError, match="cannot override 'top_k'"):
        integration.sparsify(stock, top_k=1)
    with pytest.raises(ValueError, match="Unknown sparsify override 'capacity'"):
        integration.sparsify(stock, capacity=2)
    with pytest.raises(ValueError, match="drop_tokens"):
        integration.sparsify(stock, drop_tokens="yes")
    with pytest.raises(ValueError, match="not sparsified"):
        integration.unsparsify(stock)
    with pytest.raises(ValueError, match="Backbone or CausalLM"):
        integration.sparsify(keras.Sequential([keras.layers.Dense(2)]))
    assert not integration.is_sparsified(stock)  # a failed call leaves the model stock


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="SPMD sharding with keras.distribution is implemented by the JAX backend; runs in the JAX session",
)
def test_expert_parallel_sparsified_model_trains_like_one_device(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
               PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, os.path.join(root, "tests", "keras_hub_expert_parallel.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["gate_kernel_shard_shape"] == [2, 16, 32]  # 8 experts over the 4-way expert axis
    assert result["router_shard_shape"] == [16, 8]  # replicated
    np.testing.assert_allclose(result["expert_parallel"], result["single"], atol=1e-4)
    assert result["single"][-1] < result["single"][0]
    assert result["all_to_all_in_forward"]


def test_a_missing_family_leaves_the_others_working(monkeypatch):
    import importlib
    import sys

    hidden = "keras_hub.src.models.gpt_oss.gpt_oss_decoder"
    monkeypatch.setitem(sys.modules, hidden, None)  # as if keras-hub had no GPT-OSS
    try:
        importlib.reload(integration)
        assert "GPT-OSS" in integration.MISSING_FAMILIES
        assert keras_hub.models.GptOssBackbone not in integration._FAMILIES
        assert keras_hub.models.MixtralBackbone in integration._FAMILIES
        backbone_cls, causal_lm_cls, kwargs = FAMILIES["mixtral"]
        backbone = backbone_cls(vocabulary_size=VOCAB, num_layers=1, **kwargs)
        sparse = integration.sparsify(causal_lm_cls(backbone=backbone, preprocessor=None))
        assert integration.is_sparsified(sparse)
        gpt_oss = FAMILIES["gpt_oss"]
        with pytest.raises(ValueError, match="not a backbone of a supported keras-hub MoE family"):
            integration.sparsify(gpt_oss[0](vocabulary_size=VOCAB, num_layers=1, **gpt_oss[2]))
    finally:
        monkeypatch.undo()
        importlib.reload(integration)
    assert not integration.MISSING_FAMILIES


def test_parameter_count_grows_only_by_the_routing_counters(pair):
    # The documented difference from stock: the same trainable weights, plus a few
    # non-trainable routing-statistics counters per MoE layer.
    family, stock, sparse = pair
    size = lambda weights: sum(int(np.prod(w.shape)) for w in weights)  # noqa: E731
    assert size(sparse.trainable_weights) == size(stock.trainable_weights)
    extra = sparse.count_params() - stock.count_params()
    assert 0 < extra <= 16 * len(integration.moe_layers(sparse)), (family, extra)


def test_mixed_precision_routers_compute_in_float32_and_differ_by_rounding():
    backbone_cls, causal_lm_cls, kwargs = FAMILIES["mixtral"]
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        stock, sparse = build_pair("mixtral")
        layers = integration.moe_layers(sparse)
        assert layers and all(layer.config.routing_dtype == "float32" for layer in layers)
        inputs = make_inputs("mixtral")
        real = inputs["padding_mask"]
        expected = ops.convert_to_numpy(ops.cast(stock(inputs), "float32"))[real]
        actual = ops.convert_to_numpy(ops.cast(sparse(inputs), "float32"))[real]
        assert relative_error(actual, expected) < 0.1  # bfloat16 rounding, not a different model
    finally:
        keras.config.set_dtype_policy("float32")
