"""Every python snippet of the seed README (`../shared/seeds/002_*.txt`) runs with
`dl_techniques.layers.moe` replaced by `dl_moe`, unchanged otherwise (full sizes: the
512x768 inputs are symbolic, so only weights are allocated).

The snippets are vendored in `tests/data/seed_002_python_blocks.json` (CI has no
`../shared`); when the seed file is present, a test checks the copy is verbatim.
"""

import glob
import json
import pathlib
import re
import textwrap

import keras
import numpy as np
import pytest


HERE = pathlib.Path(__file__).resolve().parent
BLOCKS = json.loads((HERE / "data" / "seed_002_python_blocks.json").read_text())
SEED = sorted(glob.glob(str(HERE.parents[1] / "shared" / "seeds" / "002_*.txt")))

# What the README leaves to the reader before some snippets: (block index, code).
CONTEXT = {
    8: (
        "model = keras.Sequential([keras.layers.Input(shape=(16, 32)), keras.layers.Dense(32),\n"
        "    create_ffn_moe(num_experts=4, hidden_dim=32, top_k=2),\n"
        "    keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(10, activation='softmax')])\n"
        "model.predict(np.random.default_rng(0).normal(size=(4, 16, 32)).astype('float32'), verbose=0)\n"
    ),
    15: "config = MoEConfig()\n",  # the troubleshooting snippets edit a MoEConfig
}
# What the snippets promise, checked right after them.
AFTER = {
    0: "assert model.output_shape == (None, 10)\n",
    2: "assert large_moe.config.num_experts == 32\n",
    3: (
        "block = create_switch_transformer_layer(hidden_dim=32, num_heads=4, num_experts=4)\n"
        "assert block(np.ones((2, 5, 32), 'float32')).shape == (2, 5, 32)\n"
    ),
    4: "assert attention_output.shape == (None, 512, 768)\n",
    5: "assert conv_output.shape == (None, 14, 14, 256)\n",
    8: "assert abs(float(np.sum(utilization)) - 1.0) < 1e-6\n",
    12: "assert MixtureOfExperts(hierarchical_config).config.hierarchical_routing\n",
    16: "assert config.gating_config.add_noise and config.gating_config.aux_loss_weight == 0.1\n",
    18: (
        "monitor_expert_utilization(moe_layer, np.random.default_rng(1).normal(size=(2, 16, 32)).astype('float32'))\n"
    ),
}


def as_dl_moe(block):
    # Blocks inside a markdown list are indented; dedent them as Markdown does.
    return textwrap.dedent(block).replace("dl_techniques.layers.moe", "dl_moe")


@pytest.mark.skipif(not SEED, reason="seed README not available (../shared/seeds)")
def test_vendored_blocks_are_verbatim():
    text = pathlib.Path(SEED[0]).read_text()
    assert re.findall(r"```python\n(.*?)```", text, re.S) == BLOCKS


def run_blocks(indices):
    namespace = {"keras": keras, "np": np}
    for i in indices:
        code = CONTEXT.get(i, "") + as_dl_moe(BLOCKS[i]) + AFTER.get(i, "")
        try:
            exec(compile(code, f"<seed README block {i}>", "exec"), namespace)
        except Exception as error:  # name the block in the failure
            raise AssertionError(f"seed README block {i} failed:\n{BLOCKS[i]}") from error
    return namespace


def test_seed_readme_snippets_run():
    run_blocks(range(len(BLOCKS)))
