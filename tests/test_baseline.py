"""Every run knows its baseline: the task's linear model on the same split and features."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from msa.cli import app
from msa.core.config import SweepConfig, TrainHeadConfig
from msa.data.demo import make_mosi_pickle
from msa.stages import import_features, sweep, train_head

runner = CliRunner()


@pytest.fixture(scope="module")
def mosi_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosi")
    path = make_mosi_pickle(root / "mosi.pkl", sizes={"train": 120, "valid": 40, "test": 20})
    import_features.run(path, root / "cache")
    return root / "cache"


def test_a_classification_run_holds_its_baseline_and_says_it(signal_cache, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-head", "--cache", str(signal_cache), "--fusion", "gmu", "--epochs", "3",
                                 "--precision", "fp32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    baseline = metrics["baseline"]
    assert baseline["model"] == "logistic regression" and 0 <= baseline["macro_f1"] <= 1
    assert baseline["n"] == metrics["n"]  # the same val items
    assert "linear baseline (logistic regression) macro-F1" in " ".join(result.output.split())


def test_a_regression_run_holds_its_ridge_baseline(mosi_cache, tmp_path):
    result = train_head.run(TrainHeadConfig(cache=mosi_cache, fusion="seq-concat", epochs=2, out=tmp_path / "run",
                                            precision="fp32"), log=lambda *_: None)
    baseline = result.metrics["baseline"]
    assert baseline["model"] == "ridge" and baseline["mae"] > 0 and "corr" in baseline
    from msa.training.tasks import TASKS

    assert TASKS["regression"].baseline_gap(result.metrics) == pytest.approx(baseline["mae"] - result.metrics["mae"])


def test_a_run_behind_its_baseline_says_so(signal_cache, tmp_path):
    result = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", epochs=1, lr=1e-7, out=tmp_path / "r",
                                            precision="fp32"), log=lambda *_: None)
    assert result.metrics["macro_f1"] < result.metrics["baseline"]["macro_f1"]
    assert any("behind its linear baseline on macro-F1" in w for w in result.warnings)


def test_no_baseline_skips_it(signal_cache, tmp_path):
    result = train_head.run(TrainHeadConfig(cache=signal_cache, epochs=1, baseline=False, out=tmp_path / "r"),
                            log=lambda *_: None)
    assert "baseline" not in result.metrics and not any("baseline" in w for w in result.warnings)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_leaderboard_has_the_baseline_gap(task, signal_cache, mosi_cache, tmp_path):
    cache, fusion = (signal_cache, "late") if task == "classification" else (mosi_cache, "seq-concat")
    cfg = SweepConfig(base=TrainHeadConfig(cache=cache, epochs=1, precision="fp32"), out=tmp_path / "sweep",
                      fusions=(fusion,), seeds=(0, 1))
    table = sweep.run(cfg, show_progress=False)
    assert table["vs_baseline"].notna().all()
    assert "vs_baseline" in pd.read_csv(cfg.out / "results.csv").columns
    board = sweep.leaderboard(table, [])
    assert "vs_baseline_mean" in board.columns
    rendered = sweep.leaderboard_table(board, [])
    assert any("vs linear" in str(c.header) for c in rendered.columns)
