"""`dl-moe bench --real-sizes` end to end at toy widths (the real widths are a benchmark)."""

import json

import keras
import pytest

from dl_moe.tools import bench, real_sizes


@pytest.fixture
def tiny_config(monkeypatch):
    monkeypatch.setattr(real_sizes, "CONFIGS", {"tiny": (16, 32, 8, 2)})
    monkeypatch.setattr(real_sizes, "XLA_CASES", (("train", 128), ("infer", 1)))
    monkeypatch.setattr(real_sizes, "DECODE_TOKENS", (1, 8))


def test_decode_study_reports_shares_of_dense_and_of_the_touched_limit(tiny_config, tmp_path):
    path = tmp_path / "out.json"
    bench.main(["--real-sizes", "--parts", "decode", "--configs", "tiny", "--repeats", "1", "--json", str(path)])
    results = json.loads(path.read_text())
    rows = results["decode"]
    assert [row["tokens"] for row in rows] == [1, 8]
    for row in rows:
        assert 1 <= row["touched_experts"] <= min(8, 2 * row["tokens"])
        for kind in ("capacity", "dropless", "all_experts"):
            assert row[f"{kind}_vs_dense"] == pytest.approx(row["dense_ms"] / row[f"{kind}_ms"], rel=0.02, abs=1e-3)
            limit_ms = max(row["dense_ms"], row["touched_limit_ms"])
            assert row[f"{kind}_vs_limit"] == pytest.approx(limit_ms / row[f"{kind}_ms"], rel=0.02, abs=1e-3)
    assert results["environment"]["backend"] == keras.backend.backend()
    assert "| tiny | 8 |" in real_sizes.markdown_tables(results)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's compile-time analysis is read through JAX")
def test_xla_study_reports_temporaries_against_the_target(tiny_config):
    rows = real_sizes.xla_analysis(["tiny"])
    assert [(r["mode"], r["tokens"], r["layer"]) for r in rows] == [
        (mode, tokens, kind) for mode, tokens in (("train", 128), ("infer", 1)) for kind in real_sizes.LAYER_KINDS
    ]
    dense = {r["mode"]: r["temp_mib"] for r in rows if r["layer"] == "dense"}
    d, h = 16, 32
    one_expert_mib = 3 * d * h * 4 / 2**20
    for row in rows:
        if row["tokens"] > 64:  # a batch: the dense-equivalent's temporaries plus the dispatched rows
            expected = 1.3 * (dense[row["mode"]] + real_sizes.dispatched_copies_mib(real_sizes.widths("tiny"), 128))
        else:  # a decode step: one expert's weights
            expected = one_expert_mib
        # The rows round to 0.1 MiB, so the dense figure the target was computed from is known to +-0.05.
        assert row["target_mib"] == pytest.approx(expected, abs=0.1)
    assert "| tiny | train | 128 |" in real_sizes.markdown_tables({"xla": rows})


def test_unknown_config_or_part_names_the_choices():
    with pytest.raises(ValueError, match="Mixtral-8x7B"):
        bench.main(["--real-sizes", "--configs", "Mixtrl"])
    with pytest.raises(ValueError, match="keras_hub"):
        bench.main(["--real-sizes", "--parts", "memory"])


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the TensorFlow study runs TensorFlow in its child processes; it runs in the TensorFlow session",
)
def test_tf_study_reads_xla_temporaries_and_a_decode_step_holds_one_expert(monkeypatch):
    monkeypatch.setattr(real_sizes, "CONFIGS", {"small": (64, 256, 8, 2)})
    rows = real_sizes.tf_xla_analysis(["small"], cases=(("train", 256), ("infer", 1)), kinds=("dense", "dropless"))
    assert [(r["mode"], r["layer"]) for r in rows] == [
        ("train", "dense"), ("train", "dropless"), ("infer", "dense"), ("infer", "dropless")
    ]
    by_case = {(r["mode"], r["layer"]): r for r in rows}
    assert by_case["train", "dense"]["temp_mib"] > 0 and by_case["train", "dropless"]["temp_mib"] > 0
    # TensorFlow's compiled grouped plan reads the routed experts one at a time.
    one_expert_mib = 3 * 64 * 256 * 4 / 2**20
    assert 0 < by_case["infer", "dropless"]["temp_mib"] <= one_expert_mib
    assert by_case["infer", "dropless"]["target_mib"] == pytest.approx(one_expert_mib, abs=1e-3)
    assert "| small | train | 256 |" in real_sizes.markdown_tables({"tf_xla": rows})
