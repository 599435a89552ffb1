"""Every ```python block of the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    import keras

    if "keras.distribution" in BLOCKS[index] and keras.backend.backend() != "jax":
        pytest.skip("keras.distribution device meshes are implemented by the JAX backend")
    if "keras_hub" in BLOCKS[index]:
        pytest.importorskip("keras_hub")
    namespace = {}
    if "layer." in BLOCKS[index] and "layer =" not in BLOCKS[index]:
        # The statistics block refers to a layer made by an earlier block.
        import numpy as np

        from dl_moe import create_ffn_moe

        layer = create_ffn_moe(num_experts=4, hidden_dim=8)
        layer(np.ones((3, 8), "float32"))
        namespace["layer"] = layer
    try:
        exec(compile(BLOCKS[index], f"README block {index}", "exec"), namespace)
    finally:
        if "keras.distribution" in BLOCKS[index]:
            keras.distribution.set_distribution(None)
