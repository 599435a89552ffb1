"""`dl-moe compare`: statistics on fixed inputs, router parsing, a tiny end-to-end run."""

import csv
import json
import math

import numpy as np
import pytest

from dl_moe.tools import cli, compare


def test_mean_std_uses_the_sample_std():
    mean, std = compare.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5.0 / 3.0))  # sum of squares 5, n - 1 = 3
    assert compare.mean_std([0.7]) == (pytest.approx(0.7), 0.0)
    with pytest.raises(ValueError):
        compare.mean_std([])


def test_welch_t_test_equal_sizes_against_the_closed_form():
    # Means 2 and 5, both variances 1: t = -3 / sqrt(1/3 + 1/3), Welch df = 4.
    t, p = compare.welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t == pytest.approx(-3.0 / math.sqrt(2.0 / 3.0))
    # Two-sided p of Student's t with 4 degrees of freedom: I_z(2, 1/2), z = 4 / (4 + t^2).
    z = 4.0 / (4.0 + t * t)
    assert p == pytest.approx(1.0 - math.sqrt(1.0 - z) * (1.0 + z / 2.0), rel=1e-9)
    assert p == pytest.approx(0.0213116, abs=1e-6)
    # Swapping the samples flips t, not p.
    t_swapped, p_swapped = compare.welch_t_test([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert t_swapped == pytest.approx(-t) and p_swapped == pytest.approx(p)


def test_welch_t_test_unequal_sizes_and_variances():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 14.0]  # means 3, 12; variances 2.5, 8
    t, p = compare.welch_t_test(a, b)
    se2 = 2.5 / 5 + 8.0 / 2  # 4.5
    df = se2**2 / ((2.5 / 5) ** 2 / 4 + (8.0 / 2) ** 2 / 1)  # Welch-Satterthwaite: 20.25 / 16.0625
    assert t == pytest.approx(-9.0 / math.sqrt(se2))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert p == pytest.approx(0.107347, abs=1e-5)


def test_welch_t_test_degenerate_samples():
    assert all(math.isnan(v) for v in compare.welch_t_test([0.9], [0.8, 0.85]))
    assert compare.welch_t_test([0.9, 0.9], [0.9, 0.9]) == (0.0, 1.0)
    assert all(math.isnan(v) for v in compare.welch_t_test([0.9, 0.9], [0.8, 0.8]))


def test_cohens_d_with_the_pooled_sample_std():
    assert compare.cohens_d([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(3.0)
    # pooled = sqrt((4 * 2.5 + 1 * 8) / 5) = sqrt(3.6)
    assert compare.cohens_d([1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 14.0]) == pytest.approx(-9.0 / math.sqrt(3.6))
    assert compare.cohens_d([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert math.isnan(compare.cohens_d([0.5], [0.5, 0.6]))


def test_flops_ratio_and_expert_evaluations():
    assert compare.flops_ratio(2.0) == 1.0
    assert compare.flops_ratio(1.0) == 0.5
    assert compare.flops_ratio(3.0, baseline_k=1) == 3.0
    with pytest.raises(ValueError):
        compare.flops_ratio(1.0, baseline_k=0)
    stats = {"avg_experts_per_token": 2.0, "dropped_fraction": 0.25}
    assert compare.expert_evaluations_per_token(stats, "linear") == pytest.approx(1.5)
    # Soft MoE: E experts * slots each, shared by a group of S tokens.
    soft = {"avg_experts_per_token": 1.0, "dropped_fraction": 0.0}
    assert compare.expert_evaluations_per_token(soft, "softmoe", num_experts=8, num_slots=1, sequence_length=8) == 1.0
    assert compare.expert_evaluations_per_token(soft, "softmoe", num_experts=8, num_slots=2, sequence_length=4) == 4.0


def _run(router, seed, accuracy, evaluations=2.0):
    return {
        "router": router, "seed": seed, "accuracy": accuracy, "avg_experts": evaluations,
        "expert_evaluations": evaluations, "load_cv": 0.1, "dropped": 0.0, "train_seconds": 1.0,
        "compile_seconds": 5.0,
    }


def test_summarize_compares_each_router_with_top2():
    runs = [_run("top2", s, a) for s, a in enumerate([1.0, 2.0, 3.0])]
    runs += [_run("top1", s, a, evaluations=1.0) for s, a in enumerate([4.0, 5.0, 6.0])]
    rows = {row["router"]: row for row in compare.summarize(runs)}
    assert math.isnan(rows["top2"]["p_value"]) and math.isnan(rows["top2"]["cohens_d"])
    assert rows["top2"]["flops_vs_top2"] == 1.0 and rows["top1"]["flops_vs_top2"] == 0.5
    assert rows["top1"]["accuracy_mean"] == pytest.approx(5.0) and rows["top1"]["accuracy_std"] == pytest.approx(1.0)
    assert rows["top1"]["p_value"] == pytest.approx(0.0213116, abs=1e-6)
    assert rows["top1"]["cohens_d"] == pytest.approx(3.0)
    table = compare.format_table(list(rows.values()))
    assert "| top1 | 5.0000 ± 1.0000 | 1.00 | 0.50 |" in table and "| n/a | n/a |" in table


def test_parse_routers():
    assert compare.parse_routers("top2, top1,top2") == ["top2", "top1"]
    with pytest.raises(ValueError, match="unknown router 'top3'"):
        compare.parse_routers("top1,top3")
    with pytest.raises(ValueError, match="at least one"):
        compare.parse_routers(" , ")
    # Every router the issue asks for is there, with a valid configuration.
    from dl_moe.factories import create_ffn_moe

    assert len(compare.ROUTERS) == 8 and compare.BASELINE in compare.ROUTERS
    for overrides in compare.ROUTERS.values():
        create_ffn_moe(8, 32, **{"top_k": 2, **overrides})


def test_compare_runs_end_to_end_and_writes_its_files(tmp_path, capsys, monkeypatch):
    from dl_moe.tools import digits

    full = digits.load_digits_tokens

    def fewer_digits(seed=0, test_fraction=0.25):
        # A quarter of the data keeps the test short on every backend (same code path).
        x_train, x_test, y_train, y_test = full(seed, test_fraction)
        return x_train[:320], x_test[:180], y_train[:320], y_test[:180]

    monkeypatch.setattr(digits, "load_digits_tokens", fewer_digits)
    code = cli.main(["compare", "--routers", "top1,top2", "--seeds", "2", "--epochs", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| router | accuracy (mean ± std) |" in out and "| top2 |" in out and "| top1 |" in out
    summary = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [row["router"] for row in summary] == ["top1", "top2"]
    runs = list(csv.DictReader(open(tmp_path / "compare_runs.csv")))
    assert len(runs) == 4
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["epochs"] == 1
    top1, top2 = report["summary"]
    assert top2["p_value"] is None and top1["p_value"] is not None
    assert 0.0 <= top1["accuracy_mean"] <= 1.0
    # top-1 routes 1 expert per token, top-2 two; FLOPs are relative to top-2.
    assert top1["avg_experts"] == pytest.approx(1.0) and top2["avg_experts"] == pytest.approx(2.0)
    # FLOPs: the assignments computed per token (routed minus dropped) / 2.
    for run in report["runs"]:
        assert run["expert_evaluations"] == pytest.approx(run["avg_experts"] * (1 - run["dropped"]), abs=0.02)
    for row in (top1, top2):
        evaluations = [r["expert_evaluations"] for r in report["runs"] if r["router"] == row["router"]]
        assert row["flops_vs_top2"] == pytest.approx(np.mean(evaluations) / 2)
    assert top1["flops_vs_top2"] <= 0.5 + 1e-6 and 0.5 <= top2["flops_vs_top2"] <= 1.0 + 1e-6
    assert (tmp_path / "accuracy_vs_experts.png").stat().st_size > 0
