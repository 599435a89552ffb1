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
        (lambda c: c.update(surprise=1), r"MoEConfig has no field 'surprise'"),
    ],
)
def test_tampered_keras_file_fails_with_a_clear_error(edit, message, tmp_path):
    # Keras wraps errors raised while deserializing a layer in a TypeError that quotes
    # the original message; either way the message names the field and the value.
    _saved_model(tmp_path / "good.keras")
    _tamper(tmp_path / "good.keras", tmp_path / "bad.keras", edit)
    with pytest.raises((ValueError, TypeError), match=message):
        keras.models.load_model(tmp_path / "bad.keras")


# ------------------------------------------------------------------ first-use errors


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: dl_moe.MoEConfig(num_expert=8), r"MoEConfig has no field 'num_expert'. Did you mean 'num_experts'"),
        (lambda: dl_moe.GatingConfig(topk=1), r"GatingConfig has no field 'topk'. Did you mean 'top_k'"),
        (lambda: dl_moe.ExpertConfig(hiden_dim=8), r"ExpertConfig has no field 'hiden_dim'. Did you mean 'hidden_dim'"),
        (lambda: dl_moe.GatingConfig(num_experts=8), r"GatingConfig has no field 'num_experts': 'num_experts' belongs to MoEConfig"),
        (lambda: dl_moe.MoEConfig(top_k=1), r"MoEConfig has no field 'top_k': 'top_k' belongs to GatingConfig.*gating_config=GatingConfig"),
        (lambda: dl_moe.MoEConfig(ffn_type="swiglu"), r"'ffn_type' belongs to ExpertConfig.*expert_config=ExpertConfig"),
    ],
)
def test_unknown_or_misplaced_config_keyword_is_a_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_attribute_assignment_is_a_value_error():
    config = dl_moe.MoEConfig(num_experts=4)
    with pytest.raises(ValueError, match=r"GatingConfig has no field 'topk'. Did you mean 'top_k'"):
        config.gating_config.topk = 1
    with pytest.raises(ValueError, match=r"'top_k' belongs to GatingConfig"):
        config.top_k = 1
    assert not hasattr(config.gating_config, "topk")


def test_valid_attribute_assignment_still_works_and_validates():
    config = dl_moe.MoEConfig(num_experts=4)
    config.gating_config.top_k = 1
    config.num_experts = 8
    assert config.gating_config.top_k == 1 and config.num_experts == 8
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts must be"):
        config.num_experts = 0
    with pytest.raises(AttributeError):
        config.gating_config.resolved_nothing  # reading an unknown name stays an AttributeError


def test_factory_and_preset_overrides_suggest_the_closest_key():
    with pytest.raises(ValueError, match=r"Unknown create_ffn_moe key 'drop_token'.*Did you mean 'drop_tokens'") as info:
        dl_moe.create_ffn_moe(4, 8, drop_token=False)
    assert "num_experts" not in str(info.value)  # no list of every key
    with pytest.raises(ValueError, match=r"'aux_los_weight'.*Did you mean 'aux_loss_weight'"):
        dl_moe.get_preset_moe("default", aux_los_weight=0.1)


def test_sparsify_and_routing_monitor_are_top_level():
    from dl_moe.callbacks import RoutingMonitor

    assert dl_moe.RoutingMonitor is RoutingMonitor
    assert "RoutingMonitor" in dl_moe.__all__
    pytest.importorskip("keras_hub")
    from dl_moe.integrations.keras_hub import sparsify

    assert dl_moe.sparsify is sparsify


def test_cli_names_the_missing_extra_in_one_line(monkeypatch, capsys):
    import sys

    from dl_moe.tools import cli

    # `import sklearn` (and of any submodule an earlier test loaded) now fails.
    for name in [name for name in sys.modules if name == "sklearn" or name.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["demo", "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'dl-moe: error: this command needs scikit-learn, which is not installed: pip install "dl_moe[demo]"'


def test_lm_compare_help_lists_every_variant(capsys):
    from dl_moe.tools import cli
    from dl_moe.tools.compare_lm import VARIANTS

    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = "".join(capsys.readouterr().out.split())
    assert "sigmoid" in VARIANTS
    assert "lm:" + ",".join(VARIANTS) in out


def test_dl_moe_imports_without_keras_hub_and_sparsify_says_what_is_missing():
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['keras_hub'] = None\n"
        "import dl_moe\n"
        "try:\n"
        "    dl_moe.sparsify\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install 'dl_moe[keras-hub]'" in result.stdout
