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
