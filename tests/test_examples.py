"""Every script in examples/ runs (tiny settings) and trains to a finite loss."""

import importlib.util
import inspect
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

TINY = {
    "switch_transformer": dict(hidden_dim=8, num_heads=2, num_experts=2, seq_len=4, num_examples=32, epochs=2),
    "mixture_of_attention": dict(hidden_dim=8, num_heads=2, num_experts=2, seq_len=4, num_examples=32, epochs=2),
    "vision_conv_moe": dict(num_experts=2, filters=4, epochs=2, max_examples=128),
    "multimodal_moe": dict(hidden_dim=8, num_experts=4, text_len=4, num_patches=4, patch_dim=4, num_examples=32,
                           epochs=2),
    "custom_expert_and_gating": dict(hidden_dim=8, num_experts=2, seq_len=4, num_examples=32, epochs=2),
    # generate() is compared with the stock model in tests/test_keras_hub.py.
    "keras_hub_sparse_moe": dict(epochs=1, hidden=16, vocab=32, seq=8, num_examples=8, generate=False),
}


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    assert {p.stem for p in EXAMPLES.glob("*.py")} == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, tmp_path):
    main = load(name).main
    kwargs = dict(TINY[name])
    if "output_dir" in inspect.signature(main).parameters:  # files go to a temporary folder
        kwargs["output_dir"] = str(tmp_path)
    result = main(verbose=0, **kwargs)
    assert np.all(np.isfinite(result["loss"]))
    if name == "custom_expert_and_gating":
        assert result["reload_difference"] < 1e-5
    if name == "keras_hub_sparse_moe":
        assert result["reload_difference"] == 0.0
