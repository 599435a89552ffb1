"""A token never influences another token's output in token-choice dropless routing."""

import numpy as np
import pytest
from keras import ops

import dl_moe


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("gating_type", ["linear", "cosine"])
def test_non_finite_token_does_not_leak(bad, gating_type):
    x = np.random.default_rng(0).normal(size=(2, 9, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(4, 8, top_k=2, intermediate_size=8, gating_type=gating_type, drop_tokens=False)
    clean = np.asarray(ops.convert_to_numpy(layer(x)))
    poisoned = x.copy()
    poisoned[1, 4, 3] = bad
    out = np.asarray(ops.convert_to_numpy(layer(poisoned)))
    others = np.ones((2, 9), bool)
    others[1, 4] = False
    np.testing.assert_array_equal(out[others], clean[others])
