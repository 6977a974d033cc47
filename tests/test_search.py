"""msa sweep --search optuna: trials drawn by TPE, pruned, resumable, reproducible, and
reported as a grid's runs are."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from msa.cli import app
from msa.core import rundir
from msa.core.config import SweepConfig, TrainHeadConfig
from msa.stages import search

BASE = dict(epochs=4, batch_size=16, patience=4, precision="fp32")


def searched(signal_cache, out, trials: int, **options) -> pd.DataFrame:
    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, **BASE), out=out, fusions=("concat", "gmu"),
                      seeds=(3,), search="optuna", trials=trials, **options)
    return search.run(cfg, show_progress=False)


def test_a_search_is_reproducible_resumable_and_reported_like_a_grid(signal_cache, tmp_path):
    first = searched(signal_cache, tmp_path / "a", trials=4)
    again = searched(signal_cache, tmp_path / "b", trials=4)
    columns = ["fusion", "lr", "weight_decay", "dropout", "hidden", "macro_f1"]
    pd.testing.assert_frame_equal(first[columns], again[columns])  # the same seed draws and trains the same
    assert (tmp_path / "a" / search.STUDY_FILE).is_file() and set(first["fusion"]) <= {"concat", "gmu"}
    summary = json.loads((tmp_path / "a" / rundir.LEADERBOARD_JSON).read_text())
    best = first.set_index("run").loc[summary["best_run"].rsplit("/", 1)[1]]
    assert best["macro_f1"] == first["macro_f1"].max() == pytest.approx(summary["leaderboard"][0]["macro_f1_mean"])
    assert {"lr", "hidden", "modalities_used", "vs_baseline_mean"} <= set(summary["leaderboard"][0])
    continued = searched(signal_cache, tmp_path / "a", trials=6)  # a rerun continues the study
    assert len(continued) == 6 and continued.head(4)[columns].equals(first[columns])
    assert not continued.tail(2)[["lr"]].isin(first["lr"].tolist()).any().any()  # new draws, not the first again


def test_a_trial_the_pruner_stops_is_pruned_and_left_out_of_the_results(signal_cache, tmp_path, monkeypatch):
    import optuna

    reported = []
    monkeypatch.setattr(optuna.trial.Trial, "report", lambda self, value, step: reported.append((step, value)))
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 0 and len(reported) >= 2)
    table = searched(signal_cache, tmp_path / "s", trials=2)
    study = optuna.load_study(study_name="msa", storage=f"sqlite:///{tmp_path / 's' / search.STUDY_FILE}")
    assert [t.state for t in study.trials][0] == optuna.trial.TrialState.PRUNED
    assert reported[:2] == [(1, pytest.approx(reported[0][1])), (2, pytest.approx(reported[1][1]))]
    assert not (tmp_path / "s" / "trial-000" / rundir.METRICS).exists()  # stopped after epoch 2, unfinished
    assert "trial-000" not in set(table["run"])


@pytest.mark.parametrize(("content", "message"), [
    ('lr = {low = 1e-2, high = 1e-4}', "lr needs low < high"),
    ('lrate = {low = 1e-4, high = 1e-2}', "'lrate' is not a train-head option"),
    ('dropout = {low = 0.1, high = 1.5}', "--dropout must be >= 0 and < 1"),
    ('hidden = {choices = []}', "hidden needs low < high"),
    ('lr = [1, 2', "not valid toml"),
])
def test_a_bad_search_space_is_one_line_before_any_file(content, message, signal_cache, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(content + "\n")
    result = CliRunner().invoke(app, ["sweep", "--cache", str(signal_cache), "--search", "optuna", "--space",
                                      str(space), "--out", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_the_space_file_decides_what_is_searched(signal_cache, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.0005, high: 0.005, log: true}\nhidden: {choices: [32, 64]}\n")
    table = searched(signal_cache, tmp_path / "s", trials=3, space=space)
    assert table["hidden"].isin([32, 64]).all() and table["lr"].between(5e-4, 5e-3).all()
    for run in table["run"]:  # what is not searched keeps the base's value
        assert json.loads((tmp_path / "s" / run / rundir.CONFIG).read_text())["dropout"] == 0.1  # concat, gmu: 0.1


def test_the_same_search_runs_on_ray_tune_with_results_of_the_same_kind(signal_cache, tmp_path):
    pytest.importorskip("ray.tune")
    local = searched(signal_cache, tmp_path / "local", trials=3)
    on_ray = searched(signal_cache, tmp_path / "ray", trials=2, backend="ray", workers=1)
    assert list(on_ray.columns) == list(local.columns) and 1 <= len(on_ray) <= 2
    assert on_ray["run"].str.startswith("trial-").all() and on_ray["hidden"].isin([128, 256, 512]).all()
    summary = json.loads((tmp_path / "ray" / rundir.LEADERBOARD_JSON).read_text())
    assert summary["best_run"].rsplit("/", 1)[1] in set(on_ray["run"])
