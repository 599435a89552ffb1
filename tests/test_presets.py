"""Presets: listing, overrides, errors, every preset through the layer checks, packaging."""

import json
import pathlib
import tomllib

import pytest

import dl_moe
from dl_moe import presets
from tests.layer_checks import run_moe_layer_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {"default", "large", "attention", "vision", "switch", "mixtral", "deepseek", "soft_moe",
            "expert_choice", "top_p"}

# Small shapes per preset for the layer checks: (overrides, per-example input shape).
SMALL = {
    "attention": ({"hidden_dim": 8, "num_heads": 2, "head_dim": 4}, (6, 8)),
    "vision": ({"filters": 4}, (5, 5, 3)),
    "deepseek": ({"hidden_dim": 8, "intermediate_size": 4, "num_experts": 8, "top_k": 3}, (6, 8)),
}


def test_lists_every_preset_from_its_own_file():
    assert set(dl_moe.list_presets()) >= EXPECTED
    assert {p.stem for p in (REPO / "presets").glob("*.json")} == set(dl_moe.list_presets())
    for name in dl_moe.list_presets():
        assert presets.preset_description(name)


def test_seed_usage_and_preset_contents():
    assert dl_moe.get_preset_moe("large", num_experts=32).config.num_experts == 32
    switch = dl_moe.get_preset_moe("switch").config
    assert switch.gating_config.top_k == 1 and switch.train_capacity_factor == 1.25
    mixtral = dl_moe.get_preset_moe("mixtral").config
    assert (mixtral.num_experts, mixtral.gating_config.top_k, mixtral.expert_config.ffn_type) == (8, 2, "swiglu")
    assert mixtral.gating_config.normalize_top_k
    deepseek = dl_moe.get_preset_moe("deepseek").config
    assert deepseek.num_shared_experts > 0 and deepseek.num_experts >= 32
    assert dl_moe.get_preset_moe("attention").config.expert_config.expert_type == "attention"
    assert dl_moe.get_preset_moe("vision").config.expert_config.expert_type == "conv2d"
    assert dl_moe.get_preset_moe("soft_moe").config.gating_config.gating_type == "softmoe"


def test_override_never_mutates_the_stored_preset():
    layer = dl_moe.get_preset_moe("default", top_k=1, hidden_dim=16)
    layer.config.num_experts = 3
    again = dl_moe.get_preset_moe("default").config
    assert (again.num_experts, again.gating_config.top_k, again.expert_config.hidden_dim) == (8, 2, 768)


def test_errors():
    with pytest.raises(ValueError, match="Available presets: .*default"):
        dl_moe.get_preset_moe("nope")
    with pytest.raises(ValueError, match="'hiden_dim'"):
        dl_moe.get_preset_moe("default", hiden_dim=3)
    with pytest.raises(ValueError, match="top_k"):
        dl_moe.get_preset_moe("default", top_k=0)


def test_malformed_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "unknown_field.json").write_text(json.dumps({"num_expertz": 3}))
    monkeypatch.setattr(presets, "PRESET_DIRS", (tmp_path,))
    with pytest.raises(ValueError, match="broken.json"):
        dl_moe.get_preset_moe("broken")
    with pytest.raises(ValueError, match="unknown_field.json.*num_expertz"):
        dl_moe.get_preset_moe("unknown_field")


def test_wheel_lists_every_subpackage():
    """Packages are listed explicitly in pyproject.toml (see the comment there)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dl_moe").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"
    assert "dl_moe.preset_files" in listed


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_passes_layer_checks(name, tmp_path):
    overrides, shape = SMALL.get(name, ({"hidden_dim": 8, "intermediate_size": 8}, (6, 8)))
    config = presets.get_preset_config(name, **overrides)
    expect_aux = name not in ("soft_moe",) or config.gating_config.z_loss_weight > 0
    run_moe_layer_checks(lambda: dl_moe.get_preset_moe(name, **overrides), shape, tmp_path,
                         expect_aux_loss=expect_aux)
