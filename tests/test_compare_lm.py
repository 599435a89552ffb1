"""`dl-moe compare --task lm`: corpus, windows, FLOP accounting, causality, end to end."""

import hashlib
import json
import math

import keras
import numpy as np
import pytest

from dl_moe.tools import cli, compare_lm, lm_data, lm_model

# A tiny setup (written here, not read back from the module under test).
TINY = {
    "sequence_length": 16, "width": 16, "num_layers": 2, "num_heads": 2, "expert_width": 8, "num_experts": 4,
    "top_k": 2, "batch_size": 4, "steps": 2, "eval_every": 1, "eval_batches": 1, "learning_rate": 1e-2,
    "warmup_steps": 1, "seeds": 2, "max_files_per_split": 3,
}


def _bucket(path):
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % 100


def _names_per_split():
    """Three file names whose hash buckets fall into train, validation and test."""
    wanted = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}
    found = {}
    for i in range(1000):
        name = f"pkg/m{i}.py"
        for split, buckets in wanted.items():
            if split not in found and _bucket(name) in buckets:
                found[split] = name
    return found


def test_corpus_split_by_path_hash_and_exclusions(tmp_path):
    names = _names_per_split()
    for split, name in names.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(f"# {split}\n".encode())
    for skipped in ("site-packages/x.py", "test/t.py", "pkg/tests/t.py", "idlelib/i.py", "turtledemo/d.py",
                    "pkg/notes.txt"):
        (tmp_path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped).write_bytes(b"excluded\n")
    assert lm_data.stdlib_files(str(tmp_path)) == sorted(names.values())
    splits, info = lm_data.load_stdlib_corpus(str(tmp_path))
    for split, name in names.items():
        assert lm_data.split_of(name) == split
        expected = f"# {split}\n".encode() + b"\x00"
        assert bytes(splits[split]) == expected and splits[split].dtype == np.uint8
        assert info[split] == {"files": 1, "bytes": len(expected)}
    (tmp_path / names["test"]).unlink()
    with pytest.raises(ValueError, match="test split"):
        lm_data.load_stdlib_corpus(str(tmp_path))


def test_windows_are_shifted_byte_slices_in_a_seeded_order():
    corpus = np.arange(41, dtype=np.uint8)  # (41 - 1) // 8 = 5 windows of 9 bytes
    np.testing.assert_array_equal(lm_data.window_starts(41, 8), [0, 8, 16, 24, 32])
    order = lm_data.training_order(41, 8, batch_size=2, num_batches=5, seed=3)
    assert order.shape == (5, 2)
    # Each pass visits every window once; two passes cover 10 slots.
    assert sorted(order.ravel()[:5]) == [0, 8, 16, 24, 32] and sorted(order.ravel()[5:]) == [0, 8, 16, 24, 32]
    np.testing.assert_array_equal(order, lm_data.training_order(41, 8, 2, 5, seed=3))
    assert not np.array_equal(order, lm_data.training_order(41, 8, 2, 5, seed=4))
    data = lm_data.LMWindows(corpus, order, 8)
    x, y = data[1]
    assert x.shape == (2, 8) and y.shape == (2, 8) and x.dtype == np.int32
    for row, start in enumerate(order[1]):
        np.testing.assert_array_equal(x[row], np.arange(start, start + 8))
        np.testing.assert_array_equal(y[row], np.arange(start + 1, start + 9))
    assert len(data.slice(1, 3)) == 2
    np.testing.assert_array_equal(data.slice(1, 3)[0][0], x)
    np.testing.assert_array_equal(lm_data.evaluation_order(41, 8, 1, 2), [[0], [32]])
    with pytest.raises(ValueError, match="5 windows"):
        lm_data.evaluation_order(41, 8, 3, 2)
    with pytest.raises(ValueError, match="too short"):
        lm_data.window_starts(8, 8)


def test_flop_and_parameter_accounting():
    d, s, layers, h, experts = 16, 12, 2, 8, 4
    attention = 8 * d * d + 4 * s * d  # projections + scores and weighted sum
    assert lm_model.attention_flops_per_token(d, s) == attention
    head = 2 * d * 256
    assert lm_model.forward_flops_per_token(d, s, layers, 4 * d * 2 * h) == 2 * attention + 2 * 4 * d * 2 * h + head
    assert lm_model.forward_flops_per_token(d, s, layers, [10.0, 30.0], router_flops_per_layer=2 * d * experts) == (
        2 * (attention + 2 * d * experts) + 40.0 + head
    )
    with pytest.raises(ValueError, match="3 entries for 2 layers"):
        lm_model.forward_flops_per_token(d, s, layers, [1.0, 2.0, 3.0])
    # The parameter-matched dense FFN has the MoE's FFN weights (experts + router) up to rounding to 8.
    width = lm_model.parameter_matched_width(d, h, experts)
    assert width % 8 == 0
    moe = lm_model.build_lm(s, d, 1, 2, ffn="moe", ffn_width=h, num_experts=experts)
    dense = lm_model.build_lm(s, d, 1, 2, ffn="dense", ffn_width=width)
    moe_ffn = experts * (2 * d * h + h + d) + d * experts
    assert lm_model.parameter_count(moe) - lm_model.parameter_count(dense) == moe_ffn - (2 * d * width + width + d)
    assert abs(moe_ffn - (2 * d * width + width + d)) <= 4 * (2 * d + 1)
    with pytest.raises(ValueError, match="ffn must be 'dense' or 'moe'"):
        lm_model.build_lm(ffn="sparse")


@pytest.mark.parametrize("variant", ["dense_flop", "top2_dropless"])
def test_the_model_is_causal(variant):
    """Changing byte j changes no logit before position j."""
    keras.utils.set_random_seed(0)
    model = compare_lm.build_variant(variant, TINY)
    x = np.random.default_rng(0).integers(0, 256, (2, 16)).astype("int32")
    changed = x.copy()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(model(changed))
    np.testing.assert_allclose(before[:, :9], after[:, :9], atol=1e-5)
    assert np.abs(before[:, 9:] - after[:, 9:]).max() > 1e-4


def test_parse_variants_keeps_out_non_causal_routers():
    assert compare_lm.parse_variants("top2, dense_flop,top2") == ["top2", "dense_flop"]
    with pytest.raises(ValueError, match="'expert_choice' is not causal"):
        compare_lm.parse_variants("top2,expert_choice")
    with pytest.raises(ValueError, match="'soft_moe' is not causal"):
        compare_lm.parse_variants("soft_moe")
    with pytest.raises(ValueError, match="unknown router 'top3'"):
        compare_lm.parse_variants("top3")
    with pytest.raises(ValueError, match="at least one"):
        compare_lm.parse_variants(",")
    assert cli.main(["compare", "--task", "lm", "--epochs", "2"]) == 2
    assert cli.main(["compare", "--steps", "2"]) == 2


def test_counters_match_the_routing_decisions():
    """The counters the comparison reads agree with `route()` on the MoE layers' inputs."""
    setup = {**TINY, "max_files_per_split": None}
    keras.utils.set_random_seed(1)
    model = compare_lm.build_variant("top_p", setup)
    corpus = np.random.default_rng(1).integers(32, 127, 2000).astype(np.uint8)
    data = lm_data.LMWindows(corpus, lm_data.evaluation_order(corpus.size, 16, 4, 2), 16)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compare_lm.layer_counters(model)  # reset
    model.evaluate(data, verbose=0)
    counters = compare_lm.layer_counters(model)
    for i, layer in enumerate(lm_model.moe_layers(model)):
        features = keras.Model(model.input, model.get_layer(f"ffn_norm_{i}").output)
        active = sum(
            layer.route(features(data[b][0]))["active"].sum() for b in range(len(data))
        )
        assert counters[i]["tokens"] == 2 * 4 * 16
        assert counters[i]["routed"] == pytest.approx(float(active))
        assert counters[i]["computed"] <= counters[i]["routed"] + 1e-6
    flops = compare_lm.forward_flops("top_p", setup, counters)
    attention = 8 * 16 * 16 + 4 * 16 * 16
    expected = sum(attention + 2 * 16 * 4 + c["computed"] / 128 * 4 * 16 * 8 for c in counters) + 2 * 16 * 256
    assert flops == pytest.approx(expected)


def test_lm_compare_end_to_end_reports_what_the_counters_measured(tmp_path, capsys):
    # Tracing and compiling the MoE train and test steps costs TensorFlow tens of seconds even
    # for this tiny model, so TensorFlow runs them eagerly here (compiled fit of every
    # router: tests/test_routers_battery.py and tests/test_compiled.py).
    eager = keras.backend.backend() == "tensorflow"
    setup = {**TINY, "jit_compile": False if eager else "auto", "run_eagerly": eager}
    rows, runs = compare_lm.run_lm_compare(routers=["dense_flop", "top_p"], output_dir=str(tmp_path), setup=setup)
    out = capsys.readouterr().out
    assert "| model | params | val bits/byte |" in out and "expert_choice" in out and "not causal" in out
    report = json.loads((tmp_path / "lm_compare.json").read_text())
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["setup"]["steps"] == 2
    assert all(report["settings"]["corpus"][split]["files"] == 3 for split in ("train", "validation", "test"))
    d, s, h = 16, 16, 8
    attention, head = 8 * d * d + 4 * s * d, 2 * d * 256
    for run in report["runs"]:
        assert run["curve"]["steps"] == [1, 2] and len(run["curve"]["val_bits_per_byte"]) == 2
        assert run["val_bits_per_byte"] == run["curve"]["val_bits_per_byte"][-1]
        assert 0 < run["val_bits_per_byte"] < 12 and math.isfinite(run["test_bits_per_byte"])
        counters = run["val_counters"]
        tokens_per_step = 4 * s
        if run["variant"] == "dense_flop":
            assert counters == [] and run["experts_per_token"] is None
            assert run["forward_flops_per_token"] == 2 * (attention + 4 * d * 2 * h) + head
            assert run["curve"]["train_flops"] == pytest.approx(
                [3 * run["forward_flops_per_token"] * tokens_per_step * n for n in (1, 2)]
            )
            continue
        # Training FLOPs: 3 x forward, each step's MoE cost from that step's own counters.
        step_flops = [
            3 * tokens_per_step * (
                sum(attention + 2 * d * 4 + c["computed"] / c["tokens"] * 4 * d * h for c in chunk) + head
            )
            for chunk in run["train_counters"]
        ]
        assert all(c["tokens"] == tokens_per_step for chunk in run["train_counters"] for c in chunk)
        assert run["curve"]["train_flops"] == pytest.approx(np.cumsum(step_flops))
        assert len(counters) == 2 and all(c["tokens"] == 1 * 4 * s for c in counters)
        experts = np.mean([c["routed"] / c["tokens"] for c in counters])
        assert run["experts_per_token"] == pytest.approx(experts)
        computed = [c["computed"] / c["tokens"] for c in counters]
        assert run["forward_flops_per_token"] == pytest.approx(
            sum(attention + 2 * d * 4 + e * 4 * d * h for e in computed) + head
        )
        assert 1.0 <= run["experts_per_token"] <= 4.0  # top-p: 1 to E experts, as measured
    by_name = {row["variant"]: row for row in report["summary"]}
    assert by_name["dense_flop"]["p_value"] is None and by_name["top_p"]["p_value"] is not None
    top_p = [r for r in report["runs"] if r["variant"] == "top_p"]
    assert by_name["top_p"]["experts_per_token"] == pytest.approx(np.mean([r["experts_per_token"] for r in top_p]))
    assert by_name["top_p"]["forward_mflops_per_token"] == pytest.approx(
        np.mean([r["forward_flops_per_token"] for r in top_p]) / 1e6
    )
    for name in ("lm_compare.csv", "lm_compare_runs.csv", "lm_bpb_vs_steps.png", "lm_bpb_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 0
