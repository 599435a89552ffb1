"""XLA's compile-time memory of the dispatch plans, at widths where weight copies show.

Nothing runs: the programs are compiled and `memory_analysis()` read, which is exact
and independent of machine load. The widths are GPT-OSS-20B's proportions at a third
of its size (d = h = 1024, E = 32, k = 4): an expert's matrices are 12 MiB, large next
to a block of rows, so a plan that copied weights per block (the `blocks` plan,
checked here to fail) would fail these bounds. `benchmarks/real_sizes.py`
measures the real widths.
"""

import math
import re

import keras
import numpy as np
import pytest

from dl_moe.tools import bench, real_sizes

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="reads XLA's memory analysis through jax.jit(...).compile(); TensorFlow compiles the same plans",
)

WIDTHS = real_sizes.Widths("scaled GPT-OSS", 1024, 1024, 32, 4)
MIB = 2**20


def temp_mib(kind, tokens, training, **overrides):
    layer = real_sizes.build_layer(WIDTHS, kind) if not overrides else bench.build_moe(
        bench.Case("scaled", tokens, 1024, 1024, 32, 4, 1.25, drop_tokens=False), normalize_top_k=True, **overrides
    )
    compiled = real_sizes._jax_compiled(layer, tokens, WIDTHS.hidden_dim, training)
    return compiled.memory_analysis().temp_size_in_bytes / MIB


@pytest.fixture(scope="module")
def dense_training_mib():
    return temp_mib("dense", 2048, training=True)


@pytest.mark.parametrize("kind", ["dropless", "capacity"])
def test_training_temporaries_stay_near_the_dense_equivalent(kind, dense_training_mib):
    limit = 1.3 * (dense_training_mib + real_sizes.dispatched_copies_mib(WIDTHS, 2048))
    assert temp_mib(kind, 2048, training=True) <= limit


def test_the_block_plan_would_not_meet_the_bound(dense_training_mib):
    # The bound above is one the gathered-weights plan fails: it is what the test guards.
    limit = 1.3 * (dense_training_mib + real_sizes.dispatched_copies_mib(WIDTHS, 2048))
    assert temp_mib("dropless", 2048, training=True, dispatch="blocks") > 2 * limit


def test_a_decode_step_holds_at_most_one_expert():
    # Capacity mode runs the same grouped plan at decode sizes (tests/test_plans.py).
    one_expert_mib = 3 * WIDTHS.hidden_dim * WIDTHS.intermediate_size * 4 / MIB
    assert temp_mib("dropless", 1, training=False) <= one_expert_mib


def test_grouped_block_size_keeps_padding_small():
    from dl_moe import dispatch

    for tokens, k, experts in [(4096, 8, 128), (4096, 2, 8), (4096, 4, 60), (1, 4, 32)]:
        block = dispatch.grouped_block_size(tokens, k, experts)
        assert block % 8 == 0 and 8 <= block <= dispatch.MAX_DROPLESS_BLOCK
        # At most a 32nd of the rows, plus the rounding up to a multiple of 8.
        assert experts * (block - 1) <= tokens * k / 32 + 7 * experts
    np.testing.assert_equal(dispatch.grouped_block_size(4096, 8, 128), 8)


def large_copies_in_loops(hlo_text, min_elements):
    """`copy` instructions of at least `min_elements` values outside the entry
    computation (in loop bodies, where they would run once per iteration)."""
    found, in_entry = [], False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
        elif line and not line.startswith(" "):
            in_entry = False
        match = re.search(r"= [a-z0-9]+\[([0-9,]+)\][^ ]* copy\(", line)
        if match and not in_entry and math.prod(int(n) for n in match.group(1).split(",")) >= min_elements:
            found.append(line.strip()[:120])
    return found


def test_the_grouped_training_step_copies_no_rows_or_weights_per_iteration():
    # A loop that overwrote a buffer it also reads makes XLA copy the whole buffer every
    # iteration: small temporaries, slow steps. Half an expert matrix is the threshold.
    layer = real_sizes.build_layer(WIDTHS, "dropless")
    compiled = real_sizes._jax_compiled(layer, 2048, WIDTHS.hidden_dim, training=True)
    text = compiled.as_text()
    assert "while" in text
    assert large_copies_in_loops(text, WIDTHS.hidden_dim * WIDTHS.intermediate_size // 2) == []
