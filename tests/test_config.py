import dataclasses

import pytest

import dl_moe
from dl_moe import ExpertConfig, GatingConfig, MoEConfig


def test_defaults_round_trip_through_dict():
    config = MoEConfig()
    assert MoEConfig.from_dict(config.to_dict()) == config


def test_custom_config_round_trip_through_dict():
    config = MoEConfig(
        num_experts=16,
        expert_config=ExpertConfig(hidden_dim=64, intermediate_size=128, ffn_type="swiglu", dropout_rate=0.1),
        gating_config=GatingConfig(gating_type="cosine", top_k=3, embedding_dim=32, normalize_top_k=True),
        drop_tokens=False,
        jitter_noise=0.05,
        routing_dtype="bfloat16",
    )
    data = config.to_dict()
    assert data["expert_config"]["ffn_type"] == "swiglu"
    restored = MoEConfig.from_dict(data)
    assert restored == config
    assert isinstance(restored.gating_config, GatingConfig)


def test_nested_dicts_are_accepted():
    config = MoEConfig(expert_config={"hidden_dim": 32}, gating_config={"top_k": 1})
    assert config.expert_config.hidden_dim == 32
    assert config.gating_config.top_k == 1


@pytest.mark.parametrize(
    "factory, field, value, allowed",
    [
        (lambda v: ExpertConfig(hidden_dim=v), "hidden_dim", 0, "a positive integer"),
        (lambda v: ExpertConfig(intermediate_size=v), "intermediate_size", -4, "a positive integer or None"),
        (lambda v: ExpertConfig(ffn_type=v), "ffn_type", "relu_glu", "['mlp', 'swiglu', 'geglu', 'geglu_tanh', 'clamped_swiglu']"),
        (lambda v: ExpertConfig(expert_type=v), "expert_type", "transformer", "one of ["),
        (lambda v: ExpertConfig(activation=v), "activation", "no_such_activation", "Keras activation"),
        (lambda v: ExpertConfig(dropout_rate=v), "dropout_rate", 1.0, "[0, 1)"),
        (lambda v: ExpertConfig(use_bias=v), "use_bias", "yes", "True or False"),
        (lambda v: GatingConfig(gating_type=v), "gating_type", "random", "'cosine'"),
        (lambda v: GatingConfig(top_k=v), "top_k", 0, "a positive integer"),
        (lambda v: GatingConfig(aux_loss_weight=v), "aux_loss_weight", -0.1, ">= 0"),
        (lambda v: GatingConfig(noise_std=v), "noise_std", 0.0, "> 0"),
        (lambda v: GatingConfig(capacity_factor=v), "capacity_factor", 0.0, "> 0 or None"),
        (lambda v: MoEConfig(num_experts=v), "num_experts", 2.5, "a positive integer"),
        (lambda v: MoEConfig(train_capacity_factor=v), "train_capacity_factor", -1.0, "> 0"),
        (lambda v: MoEConfig(eval_capacity_factor=v), "eval_capacity_factor", float("inf"), "finite"),
        (lambda v: MoEConfig(routing_dtype=v), "routing_dtype", "int8", "['float32', 'bfloat16', 'float16']"),
        (lambda v: MoEConfig(jitter_noise=v), "jitter_noise", 1.5, "[0, 1)"),
        (lambda v: MoEConfig(dispatch=v), "dispatch", "nope", "['auto', "),
        (lambda v: MoEConfig(dispatch=v), "dispatch", "gathered", "'grouped'"),
    ],
)
def test_invalid_fields_name_field_value_and_allowed(factory, field, value, allowed):
    with pytest.raises(ValueError) as error:
        factory(value)
    message = str(error.value)
    assert field in message
    assert repr(value) in message
    assert allowed in message


def test_unknown_type_names_list_the_valid_ones():
    from dl_moe.registry import EXPERT_TYPES, GATING_TYPES

    with pytest.raises(ValueError) as error:
        GatingConfig(gating_type="nope")
    assert str(GATING_TYPES.names()) in str(error.value)
    assert {"linear", "cosine", "softmoe"} <= set(GATING_TYPES.names())
    with pytest.raises(ValueError) as error:
        ExpertConfig(expert_type="nope")
    assert str(EXPERT_TYPES.names()) in str(error.value)


def test_top_k_must_not_exceed_num_experts():
    with pytest.raises(ValueError, match=r"top_k must be between 1 and num_experts=4, got 5"):
        MoEConfig(num_experts=4, gating_config=GatingConfig(top_k=5))


def test_assignment_is_validated():
    config = MoEConfig()
    config.gating_config.aux_loss_weight = 0.1
    assert config.gating_config.aux_loss_weight == 0.1
    with pytest.raises(ValueError, match="GatingConfig.noise_std"):
        config.gating_config.noise_std = -1.0
    with pytest.raises(ValueError, match="MoEConfig.train_capacity_factor"):
        config.train_capacity_factor = 0


def test_layer_revalidates_cross_field_rules():
    config = MoEConfig(num_experts=4)
    config.gating_config.top_k = 8  # valid alone, too large for 4 experts
    with pytest.raises(ValueError, match="num_experts=4"):
        dl_moe.MixtureOfExperts(config)


def test_layer_keeps_its_own_copy_of_the_config():
    config = MoEConfig(num_experts=4, expert_config=ExpertConfig(hidden_dim=8))
    layer = dl_moe.MixtureOfExperts(config)
    config.gating_config.top_k = 1
    assert layer.config.gating_config.top_k == 2


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"GatingConfig has no field 'topk'. Did you mean 'top_k'"):
        GatingConfig.from_dict({"topk": 2})
    with pytest.raises(ValueError, match="expects a dict"):
        MoEConfig.from_dict([1, 2])


def test_resolved_defaults():
    expert = ExpertConfig(hidden_dim=10)
    assert expert.resolved_intermediate_size == 40
    assert expert.resolved_output_dim == 10


def test_create_ffn_moe_overrides_any_field():
    layer = dl_moe.create_ffn_moe(
        8, 16, top_k=1, ffn_type="geglu", drop_tokens=False, aux_loss_weight=0.2, output_dim=4, jitter_noise=0.01
    )
    config = layer.config
    assert config.num_experts == 8 and config.drop_tokens is False and config.jitter_noise == 0.01
    assert config.expert_config.ffn_type == "geglu" and config.expert_config.output_dim == 4
    assert config.gating_config.top_k == 1 and config.gating_config.aux_loss_weight == 0.2


def test_create_ffn_moe_rejects_unknown_override():
    with pytest.raises(ValueError, match=r"Unknown create_ffn_moe key 'capacity'.*Did you mean"):
        dl_moe.create_ffn_moe(8, 16, capacity=2)


def test_every_field_is_documented():
    for cls in (ExpertConfig, GatingConfig, MoEConfig):
        for field in dataclasses.fields(cls):
            assert f"{field.name}:" in cls.__doc__, (cls.__name__, field.name)


@pytest.mark.parametrize(
    "expert_fields, field",
    [
        (dict(expert_type="attention", num_heads=2, intermediate_size=32), "intermediate_size"),
        (dict(expert_type="attention", num_heads=2, ffn_type="swiglu"), "ffn_type"),
        (dict(expert_type="attention", num_heads=2, activation="relu"), "activation"),
        (dict(expert_type="conv2d", filters=4, ffn_type="geglu"), "ffn_type"),
    ],
)
def test_ffn_fields_the_expert_type_ignores_are_errors(expert_fields, field):
    from dl_moe import ExpertConfig, MoEConfig

    with pytest.raises(ValueError, match=rf"ExpertConfig\.{field}=.* only used by expert_type in .*'ffn'"):
        MoEConfig(num_experts=2, expert_config=ExpertConfig(hidden_dim=8, **expert_fields))
    if expert_fields["expert_type"] == "attention":  # shared experts are FFNs that read them
        MoEConfig(num_experts=2, num_shared_experts=1, expert_config=ExpertConfig(hidden_dim=8, **expert_fields))


def test_config_docstrings_name_every_built_in_type():
    from dl_moe import ExpertConfig, GatingConfig
    from dl_moe.registry import EXPERT_TYPES, GATING_TYPES

    for registry, config in ((GATING_TYPES, GatingConfig), (EXPERT_TYPES, ExpertConfig)):
        built_in = [n for n in registry.names() if registry.get(n).__module__.startswith("dl_moe.")]
        assert len(built_in) >= 3
        for name in built_in:
            assert f'"{name}"' in config.__doc__, name
