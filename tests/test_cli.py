import os

import keras
import numpy as np
import pytest

from dl_moe.tools import cli


def test_demo_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    code = cli.main(["demo", "--epochs", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Test accuracy:" in out and "reloaded model agrees: True" in out
    assert "moe_0: experts/token 2.00" in out
    assert os.path.getsize(tmp_path / "demo.keras") > 0
    for name in ("expert_utilization.png", "routing_heatmap.png", "load_balance.png", "specialization.png"):
        assert os.path.getsize(tmp_path / name) > 0, name


def test_demo_rejects_bad_epochs(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dl-moe: error: --epochs must be >= 1") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required"),
        (["nope"], "invalid choice: 'nope'"),
        (["presets", "--bogus"], "unrecognized arguments: --bogus"),
        (["compare", "--routers", "top1,nope"], "unknown router 'nope'"),
        (["compare", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["compare", "--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["compare", "--seeds", "two"], "invalid int value: 'two'"),
        (["compare", "--bogus"], "unrecognized arguments: --bogus"),
        (["compare", "--task", "lm", "--learning-rate", "0"], "--learning-rate must be > 0, got 0.0"),
        (["compare", "--learning-rate", "1e-3"], "--steps, --batch-size and --learning-rate are for --task lm"),
    ],
)
def test_usage_errors_are_one_line_and_non_zero(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dl-moe: error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_lm_compare_passes_the_learning_rate_to_every_model(monkeypatch):
    from dl_moe.tools import compare_lm

    calls = []
    monkeypatch.setattr(compare_lm, "run_lm_compare", lambda **kwargs: calls.append(kwargs))
    assert cli.main(["compare", "--task", "lm", "--routers", "dense_param", "--learning-rate", "5e-4"]) == 0
    assert calls[0]["setup"] == {"learning_rate": 5e-4} and calls[0]["routers"] == ["dense_param"]
    assert cli.main(["compare", "--task", "lm", "--quick"]) == 0
    assert calls[1]["setup"] is None and calls[1]["quick"] is True


def test_expected_failures_are_one_line_and_exit_1(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # The output folder cannot be created (a file is in the way): an OSError, one line.
    assert cli.main(["compare", "--routers", "top2", "--seeds", "1", "--epochs", "1",
                     "--output-dir", str(blocker / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dl-moe: error: "), err


def test_presets_lists_every_preset_with_its_key_settings(capsys):
    from dl_moe.presets import list_presets

    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = out.strip().splitlines()
    for column in ("preset", "experts", "expert type", "ffn type", "router", "k", "capacity", "shared"):
        assert f" {column} " in header
    assert [row.split("|")[1].strip() for row in rows] == list_presets()
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}
    assert cells["deepseek"] == ["64", "ffn", "swiglu", "768", "linear", "6", "cf 1.25/2", "2"]
    assert cells["mixtral"][6] == "dropless" and cells["switch"][5] == "1"
    assert cells["expert_choice"][5] == "~2 avg" and cells["soft_moe"][5] == "soft (all)"
    assert cli.main(["presets", "--descriptions"]) == 0
    assert "deepseek: DeepSeekMoE-style" in capsys.readouterr().out


def test_digits_tokens_are_rows_of_pixels():
    from dl_moe.tools.digits import load_digits_tokens

    x_train, x_test, y_train, y_test = load_digits_tokens()
    assert x_train.shape[1:] == (8, 8) and len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_test)) == set(range(10))


def test_bench_runs_with_tiny_settings(capsys, monkeypatch, tmp_path):
    from dl_moe.tools import bench

    tiny = [bench.Case("a", 64, 16, 32, 4, 2, 1.0), bench.Case("a", 64, 16, 32, 4, 2, drop_tokens=False)]
    monkeypatch.setattr(bench, "STANDARD_CASES", tiny)
    out_file = tmp_path / "bench.json"
    assert cli.main(["bench", "--cases", "a", "--repeats", "1", "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "| a | cf=1 | 64 | 4 | 2 | 32 |" in out and "| a | dropless |" in out
    import json

    report = json.loads(out_file.read_text())
    assert len(report["results"]) == 2 and report["results"][0]["vs_dense"] > 0
    assert report["results"][0]["experts_only_vs_dense"] > 0


def test_bench_scaling_times_every_size_against_the_first(capsys, monkeypatch, tmp_path):
    from dl_moe.tools import bench

    tiny = [bench.Case("a", 64, 16, 32, 4, 2, 1.0)]
    monkeypatch.setattr(bench, "STANDARD_CASES", tiny)
    real_scaling_cases = bench.scaling_cases
    monkeypatch.setattr(
        bench, "scaling_cases", lambda base: real_scaling_cases(tiny[0], num_experts=(4, 8), tokens=(32, 64))
    )
    out_file = tmp_path / "bench.json"
    assert cli.main(["bench", "--cases", "a", "--repeats", "1", "--scaling", "--output", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "E=8: MoE" in printed and "experts only" in printed
    import json

    report = json.loads(out_file.read_text())
    assert [r["E"] for r in report["scaling_experts"]] == [4, 8]
    assert [r["T"] for r in report["scaling_tokens"]] == [32, 64]
    for rows in (report["scaling_experts"], report["scaling_tokens"]):
        assert rows[0]["vs_first"] == 1.0 and rows[0]["experts_only_vs_first"] == 1.0
        assert rows[1]["vs_first"] == pytest.approx(rows[1]["moe_ms"] / rows[0]["moe_ms"])
        assert rows[1]["experts_only_vs_first"] == pytest.approx(
            rows[1]["experts_only_ms"] / rows[0]["experts_only_ms"]
        )


def test_bench_inference_times_each_token_count_and_plan(capsys, monkeypatch, tmp_path):
    from dl_moe.tools import bench

    def tiny_cases(tokens, capacity_factor):
        return [bench.Case(f"T={t}", t, 16, 32, 4, 2, capacity_factor, drop) for t in tokens for drop in (True, False)]

    monkeypatch.setattr(bench, "inference_cases", tiny_cases)
    out_file = tmp_path / "inference.json"
    argv = ["bench", "--inference", "--tokens", "1,64", "--repeats", "1", "--compare-plans", "--output", str(out_file)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # The plan "auto" runs (dl_moe.dispatch_plans): T=1 (2 assignments) is a decode
    # batch, planned on the host in eager PyTorch and grouped under XLA; at T=64 (128
    # assignments) eager PyTorch runs its slices, XLA capacity buffers or (dropless,
    # experts this small, whose per-block weight copies are cheap) the blocks plan.
    eager_torch = keras.backend.backend() == "torch"
    decode = "host_slices" if eager_torch else "grouped"
    capacity = "slices" if eager_torch else "capacity"
    dropless = "slices" if eager_torch else "blocks"
    assert f"| 1 | cf=1 | {decode} |" in printed and f"| 64 | dropless | {dropless} |" in printed
    import json

    rows = json.loads(out_file.read_text())["inference"]
    assert [(r["T"], r["mode"], r["plan"]) for r in rows] == [
        (1, "cf=1", decode), (1, "dropless", decode), (64, "cf=1", capacity), (64, "dropless", dropless)
    ]
    for r in rows:
        assert r["vs_dense"] == pytest.approx(r["dense_ms"] / r["moe_ms"])
        assert r["vs_all_experts"] == pytest.approx(r["all_experts_ms"] / r["moe_ms"])
        assert ("max_load_factor" in r) == (r["mode"] == "dropless")
        # Every plan that can run the case is timed, the auto choice first (its time is moe_ms).
        portable = ["grouped", "capacity" if r["mode"] == "cf=1" else "blocks"]
        eager = (["host_slices"] if r["T"] == 1 else []) + ["slices"] if eager_torch else []
        assert list(r["plans_ms"])[0] == r["plan"] and r["plans_ms"][r["plan"]] == r["moe_ms"]
        assert sorted(r["plans_ms"]) == sorted(portable + eager)
        assert all(ms > 0 for ms in r["plans_ms"].values())
        assert f"{r['plan']} {r['moe_ms']:.3f}" in printed


def test_bench_max_load_factor_of_a_batch_on_two_experts():
    from dl_moe.tools import bench

    case = bench.Case("skewed", 16, 16, 32, 4, 2, drop_tokens=False)
    moe = bench.build_moe(case)
    # Sixteen copies of one token: all go to the same 2 of 4 experts, a load of 16
    # against a mean of 16 * 2 / 4 = 8.
    x = np.tile(np.random.default_rng(0).normal(size=(1, 16)).astype("float32"), (16, 1))
    assert bench.max_load_factor(moe, x) == pytest.approx(2.0)


def test_bench_inference_rejects_bad_token_counts():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--inference", "--tokens", "0,8"])


def test_bench_rejects_unknown_case():
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["bench", "--cases", "z"])


def test_dl_moe_command_defaults_to_jax_backend():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = "import sys; sys.argv = ['/usr/bin/dl-moe']; import dl_moe, keras; print(keras.backend.backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "jax"


def test_bench_time_steps_interleaves_and_times_only_the_call_after_settling(monkeypatch):
    from dl_moe.tools import bench

    clock = {"now": 0.0}
    calls = []

    def make_step(name, settle_cost, timed_cost):
        def step():
            # Warm-up calls cost nothing; then settling and timed calls alternate.
            position = sum(1 for c in calls if c == name) - 2
            calls.append(name)
            if position >= 0:
                clock["now"] += settle_cost if position % 2 == 0 else timed_cost

        return step

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    steps = {"a": make_step("a", 100.0, 1.0), "b": make_step("b", 100.0, 3.0)}
    medians = bench.time_steps(steps, repeats=3, warmup=2, settle=1)
    assert medians == {"a": 1.0, "b": 3.0}
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3


def test_bench_memory_grows_with_the_batch_on_every_backend():
    import dataclasses

    from dl_moe.tools import bench

    small = bench.Case("a", 256, 64, 128, 4, 2, 1.0)
    large = dataclasses.replace(small, tokens=4096)
    rows = bench.memory_table([small, large])
    for kind in ("moe", "dense"):
        assert 0 <= rows[0][f"{kind}_mb"] < rows[1][f"{kind}_mb"]
    for row in rows:
        assert row["moe_vs_dense"] == pytest.approx(row["moe_mb"] / row["dense_mb"])


def test_bench_reads_the_temp_buffer_from_an_xla_buffer_assignment_dump(tmp_path):
    from dl_moe.tools import bench

    (tmp_path / "module_0001.a_inference_tf_step_7.cpu_after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 4096, parameter 0, shape |f32[4,256]| at ShapeIndex {}:\n"
        "allocation 1: size 134697232, preallocated-temp:\n"
        " value: <1 fusion @0> (size=8,offset=0): f32[2]{0}\n"
    )
    (tmp_path / "module_0002.other.cpu_after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 99, preallocated-temp:\n"
    )
    assert bench.xla_dumped_temp_bytes(str(tmp_path), module="tf_step") == 134697232
    with pytest.raises(RuntimeError, match="found 0"):
        bench.xla_dumped_temp_bytes(str(tmp_path), module="missing")
