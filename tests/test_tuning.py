"""The KerasTuner hypermodel helper (`dl_moe.tuning`)."""

import keras
import numpy as np
import pytest

keras_tuner = pytest.importorskip("keras_tuner", reason="keras-tuner is an optional extra")

import dl_moe  # noqa: E402
from dl_moe import tuning  # noqa: E402

D, H = 4, 8
# One MLP expert: kernels d*h + h*d, biases h + d -> 76 weights, 2 FLOPs each per row.
FLOPS_PER_ROW = 2.0 * (D * H + H * D + H + D)


def build_fn(overrides):
    moe = dl_moe.create_ffn_moe(4, D, intermediate_size=H, name="moe", drop_tokens=False, **overrides)
    model = keras.Sequential([keras.Input((3, D)), moe, keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_overrides_follow_the_trial_values_and_scale_the_router_temperature():
    hypermodel = tuning.MoEHyperModel(build_fn)
    hp = keras_tuner.HyperParameters()
    hp.Fixed("top_k", 1)
    hp.Fixed("gating_type", "cosine")
    hp.Fixed("temperature_scale", 2.0)
    hp.Fixed("train_capacity_factor", 1.5)
    hp.Fixed("aux_loss_weight", 0.02)
    overrides = hypermodel.overrides(hp)
    assert overrides == {
        "top_k": 1, "gating_type": "cosine", "temperature": pytest.approx(0.14),
        "train_capacity_factor": 1.5, "aux_loss_weight": 0.02,
    }
    layer = hypermodel.build(hp).get_layer("moe")
    assert layer.config.gating_config.top_k == 1 and layer.config.train_capacity_factor == 1.5
    only_k = tuning.MoEHyperModel(build_fn, gating_types=None, temperature_scale=None, capacity_factor=None,
                                  aux_loss_weight=None)
    assert only_k.overrides(hp) == {"top_k": 1}
    with pytest.raises(ValueError, match="capacity_factor must be None or a pair"):
        tuning.MoEHyperModel(build_fn, capacity_factor=(2.0, 1.0))


def test_expert_flops_per_token_and_score():
    model = build_fn({"top_k": 2})
    model.predict(np.ones((5, 3, D), "float32"), verbose=0)
    assert tuning.expert_flops_per_row(model.get_layer("moe")) == FLOPS_PER_ROW
    # Dropless top-2: every token reaches exactly two experts.
    assert tuning.expert_flops_per_token(model, reset=True) == pytest.approx(2 * FLOPS_PER_ROW)
    assert tuning.expert_flops_per_token(model) == 0.0
    hypermodel = tuning.MoEHyperModel(build_fn, flops_weight=0.1, reference_flops=100.0)
    assert hypermodel.score(0.9, 50.0) == pytest.approx(0.9 - 0.1 * 0.5)


def test_a_tuner_trial_reports_score_accuracy_and_flops(tmp_path):
    if keras.backend.backend() == "tensorflow":
        # keras-tuner's trials import tensorboard on this backend (the `tuner` extra lists it).
        pytest.importorskip("tensorboard", reason="keras-tuner needs tensorboard on the TensorFlow backend")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, D)).astype("float32")
    y = (x[:, 0, 0] > 0).astype("int32")
    hypermodel = tuning.MoEHyperModel(build_fn, gating_types=("linear",), flops_weight=0.5)
    tuner = keras_tuner.RandomSearch(
        hypermodel, objective=keras_tuner.Objective("score", "max"), max_trials=1, seed=1,
        directory=str(tmp_path), project_name="t",
    )
    tuner.search(x, y, validation_data=(x, y), epochs=1, batch_size=16, verbose=0)
    # One trial (each costs a compiled fit): the first sets reference_flops, so its
    # FLOPs term is exactly flops_weight.
    trials = tuner.oracle.get_best_trials(1)
    assert len(trials) == 1
    for trial in trials:
        metrics = {name: trial.metrics.get_last_value(name) for name in ("score", "val_accuracy", "expert_flops_per_token")}
        top_k = trial.hyperparameters.get("top_k")
        assert metrics["expert_flops_per_token"] == pytest.approx(top_k * FLOPS_PER_ROW)
        assert metrics["score"] == pytest.approx(metrics["val_accuracy"] - 0.5)
        assert hypermodel.reference_flops == pytest.approx(top_k * FLOPS_PER_ROW)
