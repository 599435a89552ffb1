"""Bad inputs and tampered files fail with messages that say what was expected."""

import json
import zipfile

import keras
import numpy as np
import pytest

import dl_moe


def test_integer_inputs_are_a_clear_error():
    layer = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8)
    with pytest.raises(ValueError, match=r"floating-point inputs, got dtype int32"):
        layer(np.zeros((2, 8), "int32"))


def _saved_model(path):
    model = keras.Sequential([keras.Input((4, 8)), dl_moe.create_ffn_moe(4, 8, intermediate_size=8, name="moe")])
    model.save(path)


def _tamper(src, dst, edit):
    with zipfile.ZipFile(src) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    moe = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "MixtureOfExperts")
    edit(moe["config"]["config"])
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["gating_config"].update(gating_type="bogus"), r"GatingConfig.gating_type must be one of \[.*'linear'.*\], got 'bogus'"),
        (lambda c: c["expert_config"].update(ffn_type="relu2"), r"ExpertConfig.ffn_type must be one of \['mlp', 'swiglu', 'geglu', 'geglu_tanh', 'clamped_swiglu'\], got 'relu2'"),
        (lambda c: c["gating_config"].update(top_k=9), r"top_k must be between 1 and num_experts=4, got 9"),
        (lambda c: c.update(train_capacity_factor=-1), r"MoEConfig.train_capacity_factor must be a finite number > 0, got -1"),
        (lambda c: c.update(surprise=1), r"Unknown MoEConfig field\(s\) \['surprise'\]"),
    ],
)
def test_tampered_keras_file_fails_with_a_clear_error(edit, message, tmp_path):
    # Keras wraps errors raised while deserializing a layer in a TypeError that quotes
    # the original message; either way the message names the field and the value.
    _saved_model(tmp_path / "good.keras")
    _tamper(tmp_path / "good.keras", tmp_path / "bad.keras", edit)
    with pytest.raises((ValueError, TypeError), match=message):
        keras.models.load_model(tmp_path / "bad.keras")
