"""Stage 2: heads on cached features, sweeps, predict and evaluate."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from typer.testing import CliRunner

from msa.cache.features import FeatureSet
from msa.cache.manifest import read_manifest
from msa.cli import app
from msa.core.config import ConfigError, EvaluateConfig, PredictConfig, SweepConfig, TrainHeadConfig
from msa.core.rundir import RunDirError
from msa.data.demo import make_demo_dataset
from msa.models.heads import Modality, ModalityDims
from msa.models.registry import HEADS, create_head
from msa.stages import evaluate, predict, sweep, train_head

FAST = dict(epochs=12, batch_size=16, lr=3e-3, hidden=64, patience=12)


def majority_share(cache: Path) -> float:
    table = pd.read_parquet(cache / "manifest.parquet")
    return table[table.split == "val"].label.value_counts(normalize=True).max()


@pytest.mark.parametrize("fusion", sorted(h for h in HEADS if not getattr(HEADS[h], "needs_aligned", False)))
def test_every_head_trains_and_beats_the_majority_class(fusion, signal_cache, tmp_path):
    result = train_head.run(TrainHeadConfig(cache=signal_cache, fusion=fusion, out=tmp_path / fusion, **FAST),
                            log=lambda *_: None)
    assert result.metrics["accuracy"] > majority_share(signal_cache) + 0.1, result.metrics
    run_dir = result.run_dir
    for name in ("config.json", "metrics.json", "history.csv", "model.safetensors", "model.json",
                 "val_predictions.parquet", "curves.png", "confusion.png"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["fusion"] == fusion and set(config["feature_sets"]) == {"text", "image"}
    assert config["feature_sets"]["text"]["fingerprint"]["max_len"] == 16
    predictions = pd.read_parquet(run_dir / "val_predictions.parquet")
    assert len(predictions) == result.metrics["n"]
    assert ("gate" in predictions.columns) == (fusion == "gmu")
    np.testing.assert_allclose(predictions[["p_negative", "p_neutral", "p_positive"]].sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("fusion", sorted(HEADS))
def test_heads_take_any_number_of_named_modalities(fusion):
    dims = {"text": ModalityDims(12, 8), "audio": ModalityDims(6, 5), "vision": ModalityDims(4, 3)}
    head = create_head(fusion, dims, num_classes=3, hidden=16, dropout=0.0)
    batch = {name: Modality(torch.randn(5, d.pooled), torch.randn(5, 7, d.token), torch.rand(5, 7) > 0.3)
             for name, d in dims.items()}
    for m in batch.values():
        m.mask[:, 0] = True
    out = head(batch)
    assert out["logits"].shape == (5, 3) and torch.isfinite(out["logits"]).all()


def test_unknown_head_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown fusion head 'nope'; known: aligned, attention, co-attn, concat"):
        create_head("nope", {"text": ModalityDims(4, 4)}, 3)


def test_same_seed_same_metrics(signal_cache, tmp_path):
    cfg = TrainHeadConfig(cache=signal_cache, fusion="gmu", out=tmp_path / "a", seed=3, modality_dropout=0.2,
                          rdrop_alpha=0.5, loss="focal", **FAST)
    first = train_head.run(cfg, log=lambda *_: None)
    second = train_head.run(dataclasses.replace(cfg, out=tmp_path / "b"), log=lambda *_: None)
    drop_time = ("train_seconds",)
    assert {k: v for k, v in first.metrics.items() if k not in drop_time} == \
        {k: v for k, v in second.metrics.items() if k not in drop_time}
    history = [pd.read_csv(d / "history.csv").drop(columns="seconds") for d in (first.run_dir, second.run_dir)]
    pd.testing.assert_frame_equal(*history)


def test_losses_and_regularisers_change_training(signal_cache, tmp_path):
    base = TrainHeadConfig(cache=signal_cache, fusion="concat", out=tmp_path / "ce", epochs=3, batch_size=16)
    plain = pd.read_csv(train_head.run(base, log=lambda *_: None).run_dir / "history.csv")
    for change in ({"loss": "weighted-ce"}, {"loss": "focal"}, {"label_smoothing": 0.1}, {"rdrop_alpha": 1.0},
                   {"modality_dropout": 0.5}):
        name = "-".join(f"{k}{v}" for k, v in change.items())
        other = train_head.run(dataclasses.replace(base, out=tmp_path / name, **change), log=lambda *_: None)
        assert not np.allclose(pd.read_csv(other.run_dir / "history.csv").train_loss, plain.train_loss), change


def test_sweep_table_and_restart_skips_finished_runs(signal_cache, tmp_path, monkeypatch):
    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=2, batch_size=32, hidden=32),
                      out=tmp_path / "sweep", fusions=("concat", "late"), seeds=(0, 1), grid={"lr": (1e-3, 3e-3)})
    table = sweep.run(cfg, show_progress=False)
    assert len(table) == 8 and table.run.is_unique
    assert set(table.columns) >= {"fusion", "seed", "lr", "accuracy", "macro_f1", "train_seconds"}
    assert (table.modalities_used == "text+image").all()
    assert (tmp_path / "sweep" / "results.csv").is_file() and (tmp_path / "sweep" / "results.parquet").is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_head, "run", must_not_train)
    again = sweep.run(cfg, show_progress=False)
    pd.testing.assert_frame_equal(again, table)
    monkeypatch.undo()
    other_options = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, epochs=1), seeds=(0,))
    with pytest.raises(RunDirError, match="holds a finished run with other options .epochs.; pass --overwrite"):
        sweep.run(other_options, show_progress=False)  # never replaced silently
    changed = sweep.run(other_options, show_progress=False, overwrite=True)  # trained again, not skipped
    assert (changed.best_epoch == 1).all()
    board = sweep.leaderboard(table, ["lr"])
    assert len(board) == 4 and (board.runs == 2).all()
    assert board.macro_f1_mean.is_monotonic_decreasing


def test_sweep_in_two_worker_processes(signal_cache, tmp_path):
    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=2, hidden=32), out=tmp_path / "sweep",
                      fusions=("concat", "gmu"), seeds=(0, 1), workers=2)
    table = sweep.run(cfg, show_progress=False)
    assert sorted(table.run) == ["concat-seed0", "concat-seed1", "gmu-seed0", "gmu-seed1"]
    assert all((tmp_path / "sweep" / name / "model.safetensors").is_file() for name in table.run)


def test_sweep_grid_parsing():
    assert sweep.parse_grid(["lr=1e-3,3e-4", "dropout=0.1", "loss=ce,focal"]) == \
        {"lr": (1e-3, 3e-4), "dropout": (0.1,), "loss": ("ce", "focal")}
    assert sweep.parse_grid(["batch_size=32,64"]) == {"batch_size": (32, 64)}  # a field defaulting to None
    with pytest.raises(ValueError, match="expected FIELD=V1,V2"):
        sweep.parse_grid(["learning_rate=1"])


def test_predict_extracts_new_data_with_the_runs_encoders(signal_cache, tmp_path):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="co-attn", out=tmp_path / "run", **FAST),
                         log=lambda *_: None)
    new_data = make_demo_dataset(tmp_path / "new", n_labelled=10, n_test=15, seed=9)
    path, predictions = predict.run(PredictConfig(run=run.run_dir, data=new_data), show_progress=False)
    lines = path.read_text().splitlines()
    assert lines[0] == "guid,tag"
    test_guids = [line.split(",")[0] for line in (new_data / "test_without_label.txt").read_text().splitlines()[1:]]
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(test_guids)
    assert {line.split(",")[1] for line in lines[1:]} <= {"negative", "neutral", "positive"}
    # The new cache holds the run's feature sets: same fingerprint but for the manifest (and the
    # precision `auto` measured, which may differ: timed, and each test has its own decisions file).
    run_config = json.loads((run.run_dir / "config.json").read_text())
    for modality, info in run_config["feature_sets"].items():
        (new_set,) = (run.run_dir / "predict-cache" / "features").glob(f"{modality}-*.h5")
        fingerprint = FeatureSet.open(new_set).fingerprint
        assert fingerprint.pop("manifest_id") != info["fingerprint"].pop("manifest_id")
        assert fingerprint.pop("precision") in ("fp32", "bf16") and info["fingerprint"].pop("precision")
        assert fingerprint == info["fingerprint"]
    # A run directory alone (copied away, its cache gone) is enough to predict new data.
    moved = Path(shutil.copytree(run.run_dir, tmp_path / "moved", ignore=shutil.ignore_patterns("predict-cache")))
    moved_config = json.loads((moved / "config.json").read_text())
    moved_config["cache"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(moved_config))
    _, from_moved = predict.run(PredictConfig(run=moved, data=new_data), show_progress=False)
    assert from_moved.predicted == predictions.predicted
    # On the run's own data, nothing is extracted and val predictions match the run's.
    _, own = predict.run(PredictConfig(run=run.run_dir, split="val"), show_progress=False)
    saved = pd.read_parquet(run.run_dir / "val_predictions.parquet")
    assert own.predicted == saved.prediction.tolist()


def test_evaluate_matches_scikit_learn_and_reports_agreement_and_gate(signal_cache, tmp_path):
    runs = {f: train_head.run(TrainHeadConfig(cache=signal_cache, fusion=f, out=tmp_path / f, **FAST),
                              log=lambda *_: None).run_dir for f in ("gmu", "text-only", "image-only")}
    report = evaluate.run(EvaluateConfig(run=runs["gmu"], text_run=runs["text-only"], image_run=runs["image-only"]))
    saved = pd.read_parquet(runs["gmu"] / "val_predictions.parquet")
    y, p = saved.label, saved.prediction
    labels = ["negative", "neutral", "positive"]
    m = report["metrics"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=labels, zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    for i, name in enumerate(labels):
        assert m["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert m["per_class"][name]["support"] == support[i]
    agreement = report["agreement"]
    assert sum(agreement["unimodal"].values()) == agreement["items"] == len(saved)
    assert set(report["gate"]["by outcome"]) <= {"correct", "incorrect"}
    bad = pd.read_csv(tmp_path / "gmu" / "evaluation" / "bad_cases.csv")
    assert len(bad) == (y != p).sum() and "text" in bad.columns
    manifest = read_manifest(signal_cache)  # each mistake shown with its post's own text
    texts = dict(zip(manifest.guids, manifest.column("text")))
    shown = pd.read_csv(tmp_path / "gmu" / "evaluation" / "bad_cases.csv", dtype=str, keep_default_na=False)
    assert shown["text"].tolist() == [texts[g] for g in shown["guid"]]
    assert sum(report["errors by type"].values()) == len(bad)


def test_evaluate_scores_new_labelled_data(signal_cache, tmp_path):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", out=tmp_path / "run", **FAST),
                         log=lambda *_: None).run_dir
    new_data = make_demo_dataset(tmp_path / "new", n_labelled=24, n_test=5, seed=11)
    report = evaluate.run(EvaluateConfig(run=run, data=new_data))
    predictions = predict.predict(run, new_data, split="all", show_progress=False)
    truth = dict(line.split(",") for line in (new_data / "train.txt").read_text().splitlines()[1:])
    predicted = dict(zip(predictions.guids, predictions.predicted))
    y, p = [truth[g] for g in truth], [predicted[g] for g in truth]
    assert report["metrics"]["n"] == 24 and report["metrics"]["accuracy"] == pytest.approx(accuracy_score(y, p))
    bad = pd.read_csv(tmp_path / "run" / f"evaluation-{predict.data_tag(new_data)}" / "bad_cases.csv", dtype=str)
    assert len(bad) == sum(a != b for a, b in zip(y, p)) and set(bad.guid) <= set(truth)
    # A labels file picks (and labels) the items scored, and guids that are not in the data are named.
    chosen = list(truth)[:10]
    labels = tmp_path / "labels.txt"
    labels.write_text("guid,tag\n" + "".join(f"{g},{truth[g]}\n" for g in chosen))
    assert evaluate.run(EvaluateConfig(run=run, data=new_data, labels=labels))["metrics"]["n"] == 10
    labels.write_text("guid,tag\n" + "".join(f"{g},{truth[g]}\n" for g in chosen) + "no-such-guid,positive\n")
    with pytest.raises(ConfigError, match="1 guids are not in --data .*no-such-guid"):
        evaluate.run(EvaluateConfig(run=run, data=new_data, labels=labels))


def test_cli_train_head_sweep_predict_evaluate(signal_cache, tmp_path):
    runner = CliRunner(env={"COLUMNS": "200"})
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train-head", "--cache", str(signal_cache), "--fusion", "gmu", "--out",
                                 str(run_dir), "--epochs", "3", "--loss", "weighted-ce"])
    assert result.exit_code == 0, result.output
    assert "val accuracy" in result.output
    assert json.loads((run_dir / "config.json").read_text())["loss"] == "weighted-ce"
    result = runner.invoke(app, ["sweep", "--cache", str(signal_cache), "--fusion", "concat,late", "--seeds", "0,1",
                                 "--epochs", "2", "--out", str(tmp_path / "sweep"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Leaderboard" in result.output and "(4 runs)" in result.output
    out = tmp_path / "pred.txt"
    result = runner.invoke(app, ["predict", "--run", str(run_dir), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 1 + 20
    result = runner.invoke(app, ["evaluate", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "macro-F1" in result.output and "text gate (GMU)" in result.output
    result = runner.invoke(app, ["train-head", "--cache", str(signal_cache), "--fusion", "nope"])
    assert result.exit_code == 2 and "unknown fusion head 'nope'; known: aligned" in result.output


def test_evaluate_against_a_labels_file(signal_cache, tmp_path):
    run_dir = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", out=tmp_path / "run", **FAST),
                             log=lambda *_: None).run_dir
    saved = pd.read_parquet(run_dir / "val_predictions.parquet")
    labels = tmp_path / "labels.txt"
    labels.write_text("guid,tag\n" + "\n".join(f"{g},{lab}" for g, lab in zip(saved.guid, saved.label)) + "\n")
    from_file = evaluate.run(EvaluateConfig(run=run_dir, labels=labels, out=tmp_path / "a"))["metrics"]
    from_val = evaluate.run(EvaluateConfig(run=run_dir, out=tmp_path / "b"))["metrics"]
    assert from_file == from_val
    labels.write_text("guid,tag\nnot-a-guid,positive\n")
    with pytest.raises(ValueError, match="1 guids are not in the run's cache"):
        evaluate.run(EvaluateConfig(run=run_dir, labels=labels))


def test_a_run_does_not_depend_on_what_else_its_sweep_loaded(signal_cache, tmp_path):
    """A mixed sweep loads token features for every run; pooled heads must not notice."""
    cfg = TrainHeadConfig(cache=signal_cache, fusion="concat", seed=4, **FAST)
    results = [train_head.run(dataclasses.replace(cfg, out=tmp_path / str(tokens)),
                              data=train_head.load_train_data(signal_cache, (), with_tokens=tokens),
                              log=lambda *_: None).metrics for tokens in (False, True)]
    for metrics in results:
        metrics.pop("train_seconds")
    assert results[0] == results[1]


def test_head_contract_options_and_alignment(signal_cache, tmp_path):
    dims = {"text": ModalityDims(8, 8), "image": ModalityDims(6, 6)}
    # Run options reach only the heads that declare them.
    assert create_head("concat", dims, 3, 16, 0.1, sequence_encoder="transformer").hidden == 16
    assert create_head("seq-concat", dims, 1, 16, 0.1, sequence_encoder="transformer").encoders["text"].kind == \
        "transformer"
    # sum-lstm sums its modalities step by step: MVSA's text and image tokens are not aligned.
    with pytest.raises(ConfigError, match="sum-lstm needs aligned sequences .*text 16, image"):
        train_head.run(TrainHeadConfig(cache=signal_cache, fusion="sum-lstm", out=tmp_path / "run", epochs=1))
    assert not (tmp_path / "run").exists()


def test_plots_name_the_run_and_draw_the_baseline(signal_cache, tmp_path):
    from msa.training import plots

    run = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="gmu", out=tmp_path / "run", epochs=2)).run_dir
    config = json.loads((run / "config.json").read_text())
    heading = plots.title(config)
    assert heading.startswith("gmu on text + image") and all(i["name"] in heading for i in
                                                              config["feature_sets"].values())
    metrics = {"per_class": {"negative": {"support": 2}, "neutral": {"support": 1}, "positive": {"support": 7}},
               "n": 10}
    assert plots.majority_baseline(metrics, "accuracy") == pytest.approx(0.7)
    assert plots.majority_baseline(metrics, "macro_f1") == pytest.approx(2 * 0.7 / 1.7 / 3)
    history = pd.read_csv(run / "history.csv")
    assert {"train_loss", "train_macro_f1", "val_macro_f1", "lr"} <= set(history.columns)


def test_train_head_shows_progress_inside_each_epoch(signal_cache, tmp_path, monkeypatch):
    """A bar per epoch that counts every training item (long epochs: unfrozen layers, token heads)."""
    from msa.cache.manifest import read_manifest

    bars = []

    class RecordingBar:
        def __init__(self, label: str, total: int, enabled: bool, transient: bool = False):
            self.label, self.total, self.done, self.transient = label, total, 0, transient
            bars.append(self)

        def __enter__(self):
            return self.advance

        def advance(self, n: int) -> None:
            self.done += n

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(train_head, "ItemProgress", RecordingBar)
    train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", out=tmp_path / "run", **{**FAST, "epochs": 2}),
                   log=lambda *_: None, show_progress=True)
    train_items = len(read_manifest(signal_cache).rows_of_split("train"))
    assert [(b.label, b.total, b.done, b.transient) for b in bars] == [
        ("epoch 1", train_items, train_items, True), ("epoch 2", train_items, train_items, True)]
