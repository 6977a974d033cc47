"""msa from Python (msa.api): the same stages as the CLI, and posts predicted from memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import msa
from msa.api import Run
from msa.cache.manifest import read_manifest
from msa.cli import app
from msa.core import rundir
from msa.data.mvsa import read_mvsa

runner = CliRunner()


@pytest.fixture
def trained(extract_config, tmp_path):
    cfg = extract_config()
    msa.extract(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    return msa.train_head(cache=cfg.cache, fusion="concat", epochs=2, hidden=16, out=tmp_path / "run",
                          precision="fp32")


def test_the_api_round_trip_predicts_posts_in_memory_as_the_cli_predicts_their_folder(trained, messy_data_source):
    run = msa.load_run(trained.path)
    assert run.metrics["best_epoch"] >= 1 and run.config["fusion"] == "concat"
    items, _ = read_mvsa(messy_data_source)
    posts = [i for i in items if i.label is None][:4]  # the test items, predicted by the CLI below
    images = [Path(i.image_path) if Path(i.image_path).is_file() else None for i in posts]
    images[0] = Image.open(images[0]) if images[0] else None  # a PIL image as well as paths
    got = run.predict([i.text for i in posts], images)
    result = runner.invoke(app, ["predict", "--run", str(run.path), "--split", "test", "--probs", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = (run.path / "predictions-test.txt").read_text().splitlines()
    by_guid = {line.split(",")[0]: line.split(",")[1:] for line in lines[1:]}
    for post, prediction in zip(posts, got):
        label, *probabilities = by_guid[post.guid]
        assert prediction["label"] == label
        np.testing.assert_allclose(list(prediction["probabilities"].values()), [float(p) for p in probabilities],
                                   atol=1e-5)


def test_the_cli_predicts_one_post_as_json(trained, messy_data_source):
    items, _ = read_mvsa(messy_data_source)
    post = next(i for i in items if i.label is None and Path(i.image_path).is_file())
    result = runner.invoke(app, ["predict", "--run", str(trained.path), "--text", post.text, "--image",
                                 post.image_path, "--no-progress"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == trained.predict([post.text], [post.image_path])[0]
    assert set(printed["probabilities"]) == {"negative", "neutral", "positive"}


def test_loading_what_is_not_a_finished_run_is_a_named_error(tmp_path):
    with pytest.raises(rundir.RunDirError, match="not a run directory"):
        msa.load_run(tmp_path)
    (tmp_path / rundir.CONFIG).write_text("{}")
    with pytest.raises(rundir.RunDirError, match="did not finish"):
        msa.load_run(tmp_path)
    with pytest.raises(ValueError, match="one image"):
        Run(tmp_path, {}, {}).predict(["a", "b"], [None])


def test_every_command_prints_its_results_as_one_json_object(messy_data_source, tiny_models, tmp_path):
    from test_cli import extract_args

    def invoked(*args) -> dict:
        result = runner.invoke(app, [*map(str, args), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)  # stdout holds the object alone: tables and logs went to stderr

    cache = tmp_path / "cache"
    extracted = invoked(*extract_args(messy_data_source, cache, tiny_models, "--precision", "fp32"))
    manifest = read_manifest(cache)
    assert set(extracted["feature_sets"]) == {"text", "image"} and extracted["items"] >= len(manifest)
    trained = invoked("train-head", "--cache", cache, "--fusion", "concat", "--epochs", "1", "--out", tmp_path / "r")
    assert trained["run"] == str(tmp_path / "r") and "macro_f1" in trained["metrics"]
    swept = invoked("sweep", "--cache", cache, "--fusion", "concat,linear", "--seeds", "0", "--epochs", "1",
                    "--out", tmp_path / "sweep", "--no-progress")
    assert swept["runs"] == 2 and Path(swept["best_run"]).parent == tmp_path / "sweep"
    board = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    assert board["best_run"] == swept["best_run"] and board["leaderboard"][0]["modalities_used"] == "text+image"
    predicted = invoked("predict", "--run", tmp_path / "r", "--no-progress")
    tests = len(manifest.rows_of_split("test"))
    assert predicted["items"] == tests and sum(predicted["counts"].values()) == tests
    evaluated = invoked("evaluate", "--run", tmp_path / "r")
    assert evaluated["metrics"]["n"] > 0


def test_a_labelled_post_without_files_is_skipped_and_named_a_test_post_kept(messy_data):
    (messy_data / "train.txt").write_text((messy_data / "train.txt").read_text() + "ghost,Positive\n")
    (messy_data / "test_without_label.txt").write_text((messy_data / "test_without_label.txt").read_text() +
                                                       "ghost2,null\n")
    items, report = read_mvsa(messy_data)
    guids = {i.guid for i in items}
    assert "ghost" not in guids and "ghost2" in guids
    assert any(b["guid"] == "ghost" and b["problem"].startswith("no_files") for b in report.bad_items)


def test_results_warn_of_a_class_never_predicted_and_of_small_val_classes(trained):
    from msa.stages.train_head import collapse_warnings

    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    warnings = collapse_warnings({"probabilities": probabilities}, ("negative", "neutral", "positive"),
                                 np.array([0, 1, 2]))
    assert any("never predicts neutral" in w for w in warnings)
    assert sum("val holds 1 " in w and "--folds 5" in w for w in warnings) == 3
    assert any("val holds" in w for w in train_warnings(trained))  # the generated data's val split is small


def train_warnings(run) -> list[str]:
    from msa.stages import train_head

    cfg = train_head.TrainHeadConfig(cache=run.config["cache"], fusion="concat", epochs=1, hidden=16,
                                     out=run.path.parent / "again", precision="fp32")
    return train_head.run(cfg, log=lambda *_: None).warnings


def test_ctrl_c_says_how_to_resume_and_train_head_keeps_its_best_model(extract_config, tmp_path, monkeypatch):
    from msa.cli_options import INTERRUPTED
    from msa.stages import train_head

    cfg = extract_config()
    msa.extract(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    real_fit = train_head.fit

    def stopped_after_two_epochs(train_epoch, validate, *args, **kwargs):
        def train_or_stop(epoch):
            if epoch == 3:
                raise KeyboardInterrupt
            return train_epoch(epoch)
        return real_fit(train_or_stop, validate, *args, **kwargs)

    monkeypatch.setattr(train_head, "fit", stopped_after_two_epochs)
    result = runner.invoke(app, ["train-head", "--cache", str(cfg.cache), "--fusion", "concat", "--epochs", "5",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == INTERRUPTED and "interrupted: rerun the same command" in result.stderr
    assert (tmp_path / "run" / rundir.MODEL_WEIGHTS).is_file() and not (tmp_path / "run" / rundir.METRICS).exists()
    monkeypatch.setattr(train_head, "fit", real_fit)
    again = runner.invoke(app, ["train-head", "--cache", str(cfg.cache), "--fusion", "concat", "--epochs", "5",
                                "--out", str(tmp_path / "run")])  # the same command: never blocked
    assert again.exit_code == 0, again.output
    assert msa.load_run(tmp_path / "run").metrics["best_epoch"] >= 1


def test_predict_of_a_missing_dir_or_a_sweep_is_one_line_that_says_what_it_is(tmp_path):
    missing = runner.invoke(app, ["predict", "--run", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "leaderboard.json").write_text(json.dumps({"best_run": "sweep/late-seed0"}))
    sweep = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "sweep")])
    assert sweep.exit_code == 2 and "is a sweep, not a run; its best run is sweep/late-seed0" in sweep.stderr
