"""Pre-extracted sequence features (CMU-MOSI style): import, regression heads, metrics."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from msa.cache.features import FeatureSet
from msa.cache.manifest import read_manifest
from msa.core.config import EvaluateConfig, PredictConfig, SweepConfig, TrainHeadConfig
from msa.data.demo import make_mosi_pickle
from msa.data.mvsa import DataError
from msa.stages import evaluate, import_features, predict, sweep, train_head
from msa.training.metrics import regression_metrics


@pytest.fixture(scope="module")
def mosi(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosi")
    pickle_path = make_mosi_pickle(root / "mosi.pkl")
    return pickle_path, import_features.run(pickle_path, root / "cache")


def test_import_builds_a_cache_with_scores_and_one_set_per_modality(mosi):
    pickle_path, result = mosi
    with open(pickle_path, "rb") as f:
        raw = pickle.load(f)
    manifest = read_manifest(pickle_path.parent / "cache")
    assert len(manifest) == 256 and manifest.info["task"] == "regression"
    assert [len(manifest.rows_of_split(s)) for s in ("train", "val", "test")] == [160, 48, 48]
    np.testing.assert_allclose(manifest.column("score")[:160], raw["train"]["labels"].reshape(-1))
    assert manifest.guids[:2] == ["videotrain0_0", "videotrain0_1"]
    assert list(result.feature_sets) == ["text", "audio", "vision"]  # names and sizes from the file
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert result.nonfinite[split]["audio"] == int(np.isinf(raw[key]["audio"]).sum()) > 0
        assert result.nonfinite[split]["text"] == 0
    audio = FeatureSet.open(result.feature_sets["audio"])
    tokens = audio.load("tokens")
    assert tokens.shape == (256, 12, 6) and np.isfinite(tokens).all()
    mask = audio.load("mask")
    cleaned = np.nan_to_num(raw["train"]["audio"], neginf=0.0, posinf=0.0)
    padded = np.abs(cleaned).sum(-1) == 0  # all-zero steps are padding
    assert (mask[:160] == ~padded).all()


def _write(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def test_bad_files_say_what_is_wrong(tmp_path):
    good = make_mosi_pickle(tmp_path / "good.pkl", sizes={"train": 4, "valid": 2, "test": 2})
    with open(good, "rb") as f:
        data = pickle.load(f)
    no_valid = {k: v for k, v in data.items() if k != "valid"}
    with pytest.raises(DataError, match="no 'valid' split"):
        import_features.run(_write(tmp_path / "a.pkl", no_valid), tmp_path / "c1")
    ragged = {**data, "test": {**data["test"], "audio": [np.zeros((12, 6)), np.zeros((9, 6))]}}
    with pytest.raises(DataError, match="'test/audio' is ragged"):
        import_features.run(_write(tmp_path / "b.pkl", ragged), tmp_path / "c2")
    bad_labels = {**data, "train": {**data["train"], "labels": np.zeros((4, 2))}}
    with pytest.raises(DataError, match=r"'train/labels' has shape \[4, 2\], expected \[N, 1\] or \[N, 1, 1\]"):
        import_features.run(_write(tmp_path / "c.pkl", bad_labels), tmp_path / "c3")


@pytest.mark.parametrize("fusion,encoder", [("sum-lstm", "lstm"), ("attention", "transformer"),
                                            ("seq-concat", "lstm")])
def test_sequence_heads_beat_the_constant_mean(mosi, tmp_path, fusion, encoder):
    pickle_path, _ = mosi
    cache = pickle_path.parent / "cache"
    result = train_head.run(TrainHeadConfig(cache=cache, fusion=fusion, sequence_encoder=encoder, epochs=25,
                                            hidden=32, lr=3e-3, out=tmp_path / fusion), log=lambda *_: None)
    manifest = read_manifest(cache)
    scores = np.asarray(manifest.column("score"))
    val = scores[manifest.rows_of_split("val")]
    constant_mae = np.abs(val - scores[manifest.rows_of_split("train")].mean()).mean()
    assert result.metrics["mae"] < 0.8 * constant_mae
    assert result.metrics["corr"] > 0.5
    config = train_head.rundir.read_json(result.run_dir / "config.json")
    assert (config["task"], config["loss"], config["select"]) == ("regression", "l1", "mae")
    assert config["output_scaling"] == "clip"  # a sequence head's default (docs/sequences.md: tanh cost val MAE)
    table = pd.read_parquet(result.run_dir / "val_predictions.parquet")
    weights = [f"weight_{m}" for m in ("text", "audio", "vision")] if fusion == "attention" else []
    assert list(table.columns) == ["guid", "score", "prediction", *weights] and table.prediction.abs().max() <= 3
    if weights:  # the attention head's modality weights are recorded per item, summing to 1
        np.testing.assert_allclose(table[weights].sum(axis=1), 1.0, rtol=1e-5)


def test_modality_ablation_with_one_two_and_three_modalities(mosi, tmp_path):
    pickle_path, _ = mosi
    base = TrainHeadConfig(cache=pickle_path.parent / "cache", fusion="seq-concat", epochs=3, hidden=16)
    grid = sweep.parse_grid(["modalities=text,text+audio,text+audio+vision"])
    assert grid == {"modalities": (("text",), ("text", "audio"), ("text", "audio", "vision"))}
    table = sweep.run(SweepConfig(base=base, out=tmp_path / "sweep", fusions=("seq-concat",), seeds=(0,), grid=grid),
                      show_progress=False)
    assert len(table) == 3 and {"mae", "corr", "acc2", "non0_acc2", "acc7"} <= set(table.columns)
    read = [sorted(train_head.rundir.read_json(tmp_path / "sweep" / run / "config.json")["feature_sets"])
            for run in table["run"]]
    assert read == [["text"], ["audio", "text"], ["audio", "text", "vision"]]
    board = sweep.leaderboard(table, ["modalities"])
    assert board["mae_mean"].is_monotonic_increasing  # best (lowest MAE) first


def test_predict_and_evaluate_a_regression_run(mosi, tmp_path):
    pickle_path, _ = mosi
    run = train_head.run(TrainHeadConfig(cache=pickle_path.parent / "cache", fusion="seq-concat", epochs=3,
                                         hidden=16, out=tmp_path / "run", loss="huber", output_scaling="sigmoid"),
                         log=lambda *_: None)
    path, predictions = predict.run(PredictConfig(run=run.run_dir), show_progress=False)
    lines = path.read_text().splitlines()
    assert lines[0] == "guid,score" and len(lines) == 49
    assert all(-3 <= float(line.split(",")[1]) <= 3 for line in lines[1:])
    report = evaluate.run(EvaluateConfig(run=run.run_dir))
    assert report["metrics"]["mae"] == pytest.approx(run.metrics["mae"])
    with pytest.raises(ValueError, match="--select must be one of mae, corr, loss"):
        train_head.run(TrainHeadConfig(cache=pickle_path.parent / "cache", fusion="seq-concat", select="macro_f1",
                                       out=tmp_path / "x"), log=lambda *_: None)


def test_regression_metrics_match_hand_computed_values():
    y_true = np.array([-2.6, -0.4, 0.0, 0.0, 1.2, 2.8])
    y_pred = np.array([-1.9, 0.3, -0.2, 0.1, 1.6, 2.2])
    m = regression_metrics(y_true, y_pred)
    assert m["mae"] == pytest.approx((0.7 + 0.7 + 0.2 + 0.1 + 0.4 + 0.6) / 6)
    assert m["corr"] == pytest.approx(np.corrcoef(y_true, y_pred)[0, 1])
    # Acc-2 (negative vs non-negative): true [T F F F F F] < 0 ... predictions [T F T F F F] < 0
    assert m["acc2"] == pytest.approx(4 / 6)
    # Non0: the four items with a non-zero score; predicted signs - + + + against - - + +
    assert m["non0_acc2"] == pytest.approx(3 / 4)
    # Acc-7: round(clip(.., -3, 3)): true [-3 -0 0 0 1 3] vs predicted [-2 0 -0 0 2 2]
    assert m["acc7"] == pytest.approx(3 / 6)
    # Acc-5: clip to [-2, 2] first: true [-2 -0 0 0 1 2] vs predicted [-2 0 -0 0 2 2]
    assert m["acc5"] == pytest.approx(5 / 6)


def test_training_curves_go_to_tensorboard_when_it_is_installed(mosi, tmp_path, monkeypatch):
    logged = []

    class FakeWriter:  # tensorboard is not a dependency; this stands in for its SummaryWriter
        def add_scalar(self, tag, value, step):
            logged.append((tag, step))

        def close(self):
            logged.append(("closed", None))

    monkeypatch.setattr(train_head.rundir, "tensorboard_writer", lambda run_dir: FakeWriter())
    pickle_path, _ = mosi
    train_head.run(TrainHeadConfig(cache=pickle_path.parent / "cache", fusion="seq-concat", epochs=2, hidden=16,
                                   out=tmp_path / "run"), log=lambda *_: None)
    assert ("val/mae", 1) in logged and ("train/loss", 2) in logged and logged[-1] == ("closed", None)
