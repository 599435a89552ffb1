import os

import numpy as np

from dl_moe import cli


def test_demo_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    code = cli.main(["demo", "--epochs", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Test accuracy:" in out and "reloaded model agrees: True" in out
    assert "moe_0: experts/token 2.00" in out
    assert os.path.getsize(tmp_path / "demo.keras") > 0
    assert os.path.getsize(tmp_path / "expert_utilization.png") > 0


def test_demo_rejects_bad_epochs(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_digits_tokens_are_rows_of_pixels():
    from dl_moe.demo import load_digits_tokens

    x_train, x_test, y_train, y_test = load_digits_tokens()
    assert x_train.shape[1:] == (8, 8) and len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_test)) == set(range(10))


def test_bench_runs_with_tiny_settings(capsys, monkeypatch, tmp_path):
    from dl_moe import bench

    tiny = [bench.Case("a", 64, 16, 32, 4, 2, 1.0), bench.Case("a", 64, 16, 32, 4, 2, drop_tokens=False)]
    monkeypatch.setattr(bench, "STANDARD_CASES", tiny)
    out_file = tmp_path / "bench.json"
    assert cli.main(["bench", "--cases", "a", "--repeats", "1", "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "| a | cf=1 | 64 | 4 | 2 | 32 |" in out and "| a | dropless |" in out
    import json

    report = json.loads(out_file.read_text())
    assert len(report["results"]) == 2 and report["results"][0]["vs_dense"] > 0


def test_bench_rejects_unknown_case():
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["bench", "--cases", "z"])
