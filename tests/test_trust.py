"""Trust by class: every input confined, no code run, finite values, rows tied to guids,
nothing replaced that msa did not make. Each class has one mechanism; each test here is one
case of a class (the issue's example and cases of our own), recorded for bench/faults.py.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from msa.cache import maintenance
from msa.cache.features import FeatureSet, feature_path, problem_of
from msa.cache.manifest import read_manifest
from msa.cache.writer import FeatureWriter
from msa.core import rundir
from msa.core.compute import resolve_compute
from msa.core.config import CaptionConfig, ConfigError, ExtractConfig, SweepConfig, TrainHeadConfig
from msa.core.errors import CacheError
from msa.core.finite import NonFiniteError
from msa.data.demo import make_demo_dataset, make_mosi_pickle
from msa.data.mvsa import MAX_TEXT_BYTES, DataError, check_image, read_mvsa
from msa.models.build import model_with_weights
from msa.models.captioner import TransformersCaptioner
from msa.models.image import decode_rgb
from msa.models.text import EncoderLoadError, TextEncoder
from msa.stages import extract, import_features, predict, sweep, train_head

SECRET = "the-secret-outside-the-data"


def cli(*args, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msa.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
                          stdin=subprocess.DEVNULL, **popen)


def one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stdout
    for text in expected:
        assert text in lines[0], lines[0]


def typed_in_process(args: list[str], message: str) -> None:
    """The command run in this process (the subprocess's path, seconds of imports spared): one
    line starting `error:` with `message` in it, exit code 2."""
    from typer.testing import CliRunner

    from msa.cli import app

    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and message in lines[0], lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


# --- 1. --overwrite replaces only what msa made --------------------------------------------------

def users_project(root: Path, config: str | None = '{"kind": "train-head"}') -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "model.py").write_text("print('mine')\n")
    (root / "notes.txt").write_text("three weeks of notes\n")
    if config is not None:
        (root / "config.json").write_text(config)
    return root


@pytest.mark.parametrize("config", ['{"kind": "train-head"}', '{"kind": "finetune", "seed": 1}', "not json {",
                                    '["a", "list"]'])
def test_overwrite_never_deletes_a_folder_msa_did_not_mark(config, signal_cache, tmp_path, outcome):
    project = users_project(tmp_path / "proj", config)
    before = tree(project)
    with pytest.raises(rundir.RunDirError, match="not an msa run directory"):
        train_head.run(TrainHeadConfig(cache=signal_cache, out=project, epochs=1), overwrite=True)
    assert tree(project) == before
    outcome(f"--out --overwrite onto a user's folder with config.json {config[:18]!r}", "clean error")


def test_overwrite_keeps_a_file_the_user_added_to_a_run(signal_cache, tmp_path, outcome):
    cfg = TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)
    train_head.run(cfg)
    (cfg.out / "my-analysis.ipynb").write_text("{}")
    (cfg.out / "refit").mkdir()
    (cfg.out / "refit" / "thesis.tex").write_text("chapter 1")
    before = tree(cfg.out)
    with pytest.raises(rundir.RunDirError, match="holds files msa did not write .my-analysis.ipynb, refit/thesis.tex"):
        train_head.run(cfg, overwrite=True)
    assert tree(cfg.out) == before
    outcome("--overwrite of a run holding the user's own files", "clean error")


def test_overwrite_never_follows_a_link_out_of_the_run(signal_cache, tmp_path, outcome):
    cfg = TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)
    train_head.run(cfg)
    precious = users_project(tmp_path / "elsewhere", None)
    before = tree(precious)
    (cfg.out / "tensorboard").symlink_to(precious)  # an owned name, but a link: never removed through
    with pytest.raises(rundir.RunDirError, match="did not write .tensorboard"):
        train_head.run(cfg, overwrite=True)
    linked_out = tmp_path / "linked-run"
    linked_out.symlink_to(precious)
    with pytest.raises(rundir.RunDirError, match="not a directory msa made"):
        train_head.run(TrainHeadConfig(cache=signal_cache, out=linked_out, epochs=1), overwrite=True)
    assert tree(precious) == before
    outcome("--overwrite through a symlink (an entry, or --out itself)", "clean error")


def test_an_unfinished_run_never_blocks_its_rerun(signal_cache, tmp_path, outcome, monkeypatch):
    cfg = TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_head.rundir, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_head.run(cfg)
    monkeypatch.undo()
    result = train_head.run(cfg)  # no --overwrite needed: nothing finished was there
    assert rundir.is_finished(result.run_dir) and rundir.marked_kind(result.run_dir) == "train-head"
    outcome("rerun into a run directory left by Ctrl-C", "identical")


def test_a_resumable_run_is_never_taken_over_unasked(tmp_path, outcome):
    run = tmp_path / "ft"
    rundir.claim(run, "finetune").release()
    (run / "last.pt").write_bytes(b"hours of training")
    with pytest.raises(rundir.RunDirError, match="can resume; pass --resume"):
        rundir.claim(run, "finetune")
    assert (run / "last.pt").read_bytes() == b"hours of training"
    rundir.claim(run, "finetune", overwrite=True).release()
    assert not (run / "last.pt").exists() and rundir.marked_kind(run) == "finetune"
    outcome("finetune rerun (no --resume) onto a run that can resume", "clean error")


# --- 2. nothing is read outside the inputs ------------------------------------------------------

@pytest.fixture
def secret(tmp_path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    Image.new("RGB", (40, 40), (250, 0, 0)).save(outside / "secret.jpg")
    return outside


@pytest.mark.parametrize("kind", ["text", "image", "both"])
def test_a_link_out_of_the_data_folder_is_a_bad_item_never_read(kind, messy_data, secret, outcome):
    items, _ = read_mvsa(messy_data)
    guid = items[0].guid
    if kind in ("text", "both"):
        (messy_data / "data" / f"{guid}.txt").unlink()
        (messy_data / "data" / f"{guid}.txt").symlink_to(secret / "secret.txt")
    if kind in ("image", "both"):
        (messy_data / "data" / f"{guid}.jpg").unlink(missing_ok=True)
        (messy_data / "data" / f"{guid}.jpg").symlink_to(secret / "secret.jpg")
    items, report = read_mvsa(messy_data)
    item = next(i for i in items if i.guid == guid)
    assert all(SECRET not in i.text for i in items)
    expected = {"text": {"outside_text"}, "image": {"outside_image"}, "both": {"outside_text", "outside_image"}}[kind]
    assert expected <= set(item.flags)
    assert {b["problem"] for b in report.bad_items if b["guid"] == guid} >= expected
    assert all(":" in b["where"] for b in report.bad_items if b["guid"] == guid)  # FILE:LINE
    outcome(f"data/GUID {kind} file linked outside the data folder", "clean error", "read outside")


def test_a_label_file_linked_outside_is_refused(messy_data, secret, outcome):
    (secret / "train.txt").write_text((messy_data / "train.txt").read_text())
    (messy_data / "train.txt").unlink()
    (messy_data / "train.txt").symlink_to(secret / "train.txt")
    with pytest.raises(DataError, match="outside"):
        read_mvsa(messy_data)
    outcome("train.txt linked outside the data folder", "clean error", "read outside")


def write_h5_export(path: Path, how: str, outside: Path) -> Path:
    """An import file whose train/text reaches outside: external storage, an external link, a virtual dataset."""
    raw = outside / "raw.bin"
    np.arange(24, dtype=np.float32).tofile(raw)
    other = outside / "other.h5"
    with h5py.File(other, "w") as f:
        f["text"] = np.ones((2, 3, 4), np.float32)
    with h5py.File(path, "w") as f:
        for split in ("train", "valid", "test"):
            group = f.create_group(split)
            group["labels"] = np.zeros((2, 1), np.float32)
            if how == "external storage":
                group.create_dataset("text", shape=(2, 3, 4), dtype=np.float32, external=[(str(raw), 0, 96)])
            elif how == "external link":
                group["text"] = h5py.ExternalLink(str(other), "/text")
            else:
                layout = h5py.VirtualLayout(shape=(2, 3, 4), dtype=np.float32)
                layout[:] = h5py.VirtualSource(str(other), "text", shape=(2, 3, 4))
                group.create_virtual_dataset("text", layout)
    return path


@pytest.mark.parametrize("how", ["external storage", "external link", "virtual dataset"])
def test_an_import_reaching_outside_its_file_is_refused(how, secret, tmp_path, outcome):
    path = write_h5_export(tmp_path / "features.h5", how, secret)
    with pytest.raises(DataError, match="msa reads only data inside the files it was given"):
        import_features.run(path, tmp_path / "cache")
    assert not (tmp_path / "cache" / "features").exists()
    outcome(f"import .h5 with {how}", "clean error", "read outside")


def test_a_cache_set_with_external_storage_fails_verify_and_open(signal_cache, secret, tmp_path, outcome):
    import shutil

    cache = Path(shutil.copytree(signal_cache, tmp_path / "cache"))
    path = sorted((cache / "features").glob("*.h5"))[0]
    with h5py.File(path, "r+") as f:
        np.zeros(4, np.float32).tofile(secret / "raw.bin")
        f.create_dataset("extra", shape=(4,), dtype=np.float32, external=[(str(secret / "raw.bin"), 0, 16)])
    assert "not self-contained" in problem_of(path)
    verified = {finding.path: finding.reason for finding in maintenance.verify(cache)}
    assert "external file" in verified[path]
    with pytest.raises(CacheError, match="not self-contained"):
        FeatureSet.open(path)
    outcome("cache set given HDF5 external storage", "clean error", "read outside")


# --- 3. no code from a model directory -----------------------------------------------------------

def planted_model(tiny_models, tmp_path, config_file: str) -> Path:
    import shutil

    model = Path(shutil.copytree(tiny_models["text"], tmp_path / "planted"))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    config = json.loads((model / config_file).read_text()) if (model / config_file).is_file() else {}
    config["auto_map"] = {"AutoModel": "evil.Model", "AutoTokenizer": ["evil.Tokenizer", None]}
    if config_file == "config.json":
        config["model_type"] = "not-a-known-type"
    (model / config_file).write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_model_dir_asking_to_run_its_code_is_refused(config_file, tiny_models, tmp_path, outcome):
    model = planted_model(tiny_models, tmp_path, config_file)
    with pytest.raises(EncoderLoadError, match="asks to run its own code .auto_map.; msa never runs code"):
        TextEncoder(str(model))
    assert not (tmp_path / "ran").exists()
    outcome(f"text model dir with auto_map in {config_file}", "clean error", "code ran")


def test_remote_code_is_refused_by_extract_and_caption_answering_nothing(tiny_models, messy_data_source, tmp_path,
                                                                         outcome):
    model = planted_model(tiny_models, tmp_path, "config.json")
    result = cli("extract", "--data", messy_data_source, "--cache", tmp_path / "cache", "--text-model", model,
                 "--modalities", "text", "--max-len", "16", "--precision", "fp32", "--no-progress", input=None)
    one_line_error(result, "asks to run its own code")
    import shutil

    blip = Path(shutil.copytree(tiny_models["captioner"], tmp_path / "blip"))
    config = json.loads((blip / "config.json").read_text())
    (blip / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(EncoderLoadError, match="asks to run its own code"):
        TransformersCaptioner(CaptionConfig(data=messy_data_source, model=str(blip)), resolve_compute("cpu", "fp32"),
                              False)
    assert not (tmp_path / "ran").exists()
    outcome("extract / caption of a model dir with auto_map, stdin closed", "clean error", "code ran")


# --- 4. non-finite values never pass --------------------------------------------------------------

def test_nan_weights_are_refused_before_predicting(signal_cache, tmp_path, outcome):
    from safetensors.torch import load_file, save_file

    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    weights = load_file(str(run / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, str(run / "model.safetensors"))
    with pytest.raises(rundir.RunDirError, match=f"{first} holds NaN"):
        predict.run(predict.PredictConfig(run=run), show_progress=False)
    assert not list(run.glob("predictions-*"))
    outcome("NaN in a head's weights, then predict", "clean error", "wrong result")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_a_non_finite_row_is_named_at_write(value, tmp_path, outcome):
    path = feature_path(tmp_path / "cache", "text-x-1")
    pooled = np.ones((3, 4), np.float32)
    pooled[1, 2] = value  # 1e6: finite in float32, inf once stored as float16
    with FeatureWriter(path, {"modality": "text"}, ["a", "b", "c"], np.arange(3)) as writer:
        with pytest.raises(NonFiniteError, match=r"guids b\)"):
            writer.write(np.arange(3), pooled, np.ones((3, 2, 4), np.float32), np.ones((3, 2), bool))
    assert not path.exists()
    outcome(f"feature value {value:g} at write (after the float16 cast)", "clean error", "wrong result")


def test_a_row_made_nan_on_disk_is_named_at_load_and_by_verify(signal_cache, tmp_path, outcome):
    import shutil

    from msa.cache.features import content_digest

    cache = Path(shutil.copytree(signal_cache, tmp_path / "cache"))
    path = sorted((cache / "features").glob("*.h5"))[0]
    with h5py.File(path, "r+") as f:
        guid = f["guid"].asstr()[5]
        f["pooled"][5, 0] = np.inf
        f.attrs["digest"] = content_digest(f)  # a consistent file: only the value is wrong
    with pytest.raises(NonFiniteError, match=f"guids {guid}"):
        FeatureSet.open(path).load("pooled")
    verified = {finding.path: finding.reason for finding in maintenance.verify(cache)}
    assert f"holding NaN or infinite values in 'pooled' (guid {guid})" in verified[path]
    outcome("inf planted in a published set (digest redone)", "clean error", "wrong result")


def test_nan_predictions_are_never_written(tmp_path, outcome):
    predictions = predict.Predictions(["1", "2"], [None, None], np.array([[0.2, 0.3, 0.5], [np.nan] * 3]), None,
                                      ["negative", "neutral", "positive"])
    with pytest.raises(NonFiniteError, match="guids 2"):
        predict.write_predictions_file(predictions, tmp_path / "out.txt", probs=True)
    assert not (tmp_path / "out.txt").exists()
    outcome("NaN probabilities reaching the predictions file", "clean error", "wrong result")


def test_an_import_value_past_float16_is_named(tmp_path, outcome):
    path = make_mosi_pickle(tmp_path / "mosi.pkl", sizes={"train": 8, "valid": 4, "test": 4})
    data = pickle.loads(path.read_bytes())
    data["test"]["vision"][2, -1, 0] = 1e6
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(NonFiniteError, match="as stored in float16"):
        import_features.run(path, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "features").glob("*.h5"))
    outcome("imported value past float16's range", "clean error", "wrong result")


# --- 5. rows tied to guids, the manifest keyed on content -----------------------------------------

@pytest.mark.parametrize("edit", ["row removed", "rows swapped"])
def test_a_manifest_edited_by_hand_never_pairs_rows_with_other_features(edit, signal_cache, tmp_path, outcome):
    import shutil

    cache = Path(shutil.copytree(signal_cache, tmp_path / "cache"))
    table = pq.read_table(cache / "manifest.parquet")
    order = list(range(table.num_rows))
    order = order[:3] + order[4:] if edit == "row removed" else [order[1], order[0], *order[2:]]
    pq.write_table(table.take(order).replace_schema_metadata(table.schema.metadata), cache / "manifest.parquet")
    with pytest.raises(CacheError, match="rows no longer match feature set"):
        train_head.run(TrainHeadConfig(cache=cache, out=tmp_path / "run", epochs=1))
    outcome(f"manifest {edit}, its metadata kept", "clean error", "wrong result")


@pytest.mark.parametrize("what", ["label", "text"])
def test_a_file_edited_in_place_rebuilds_the_manifest(what, extract_config, messy_data, outcome):
    cfg = extract_config(data=messy_data, modalities=("lexicon",))
    first = extract.run(cfg, show_progress=False).manifest
    if what == "label":  # positive <-> negative: the file keeps its size
        path = messy_data / "train.txt"
        lines = path.read_text().splitlines()
        listed = [line.split(",")[0] for line in lines]
        index = next(i for i, line in enumerate(lines)
                     if line.endswith((",positive", ",negative")) and listed.count(listed[i]) == 1)
        guid, label = lines[index].split(",")
        swapped = {"positive": "negative", "negative": "positive"}[label]
        lines[index] = f"{guid},{swapped}"
        new = ("\n".join(lines) + "\n").encode()
    else:
        guid = next(g for g, t in zip(first.guids, first.column("text")) if len(t) > 3)
        path = messy_data / "data" / f"{guid}.txt"
        new = b"x" * path.stat().st_size
    stat = path.stat()
    assert len(new) == stat.st_size
    path.write_bytes(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same time
    manifest = extract.run(cfg, show_progress=False).manifest
    row = manifest.guids.index(guid)
    if what == "label":
        assert manifest.column("label")[row] == swapped
    else:
        assert manifest.column("text")[row] == "x" * stat.st_size
    outcome(f"{what} edited in place, size and mtime kept", "identical", "wrong result")


# --- 6. finished only when all of it is -----------------------------------------------------------

def test_a_run_killed_during_its_refit_is_unfinished_and_completed_by_a_rerun(signal_cache, tmp_path, outcome,
                                                                              monkeypatch):
    cfg = TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=2, refit=True)
    real_refit = train_head.refit

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_head, "refit", killed)
    with pytest.raises(KeyboardInterrupt):
        train_head.run(cfg)
    assert (cfg.out / "metrics.json").is_file() and not rundir.is_finished(cfg.out)
    monkeypatch.setattr(train_head, "refit", real_refit)
    train_head.run(cfg)  # the rerun completes it, no --overwrite
    assert rundir.is_finished(cfg.out)
    path, _ = predict.run(predict.PredictConfig(run=cfg.out), show_progress=False)
    assert path.is_file()
    outcome("kill during train-head --refit", "identical")


def test_a_sweep_killed_during_a_refit_completes_that_run(signal_cache, tmp_path, outcome, monkeypatch):
    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=1, refit=True), out=tmp_path / "sweep",
                      seeds=(0, 1))
    real_refit, calls = train_head.refit, []

    def killed_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_refit(*args, **kwargs)

    monkeypatch.setattr(train_head, "refit", killed_second)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg, show_progress=False)
    monkeypatch.setattr(train_head, "refit", real_refit)
    table = sweep.run(cfg, show_progress=False)
    assert all(rundir.is_finished(cfg.out / run) for run in table.run)
    assert all((cfg.out / run / "refit" / "model.safetensors").is_file() for run in table.run)
    outcome("kill during sweep --refit", "identical")


# --- 7. CSV written and read with the csv module ---------------------------------------------------

@pytest.mark.parametrize("guid", ["a,b", 'say "hi"', "line\nbreak", " spaced "])
def test_predictions_round_trip_any_guid(guid, tmp_path, outcome):
    guids = [guid, "plain"]
    predictions = predict.Predictions(guids, [None, None], np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]), None,
                                      ["negative", "neutral", "positive"])
    path = predict.write_predictions_file(predictions, tmp_path / "out.txt", probs=True)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["guid", "tag", "p_negative", "p_neutral", "p_positive"]
    assert [r[0] for r in rows[1:]] == guids and [r[1] for r in rows[1:]] == ["positive", "negative"]
    outcome(f"predictions file with a guid {guid!r}", "identical", "wrong result")


# --- 8. images as a viewer shows them -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_deep_grey_images_keep_their_grey(mode, tmp_path, outcome):
    path = tmp_path / ("grey.png" if mode == "I;16" else "grey.tif")
    image = Image.fromarray(np.full((48, 64), 32768, dtype=np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    image.save(path)
    pixels = decode_rgb(str(path), 32)
    assert pixels.shape == (3, 48, 64) and abs(int(pixels.float().mean()) - 128) <= 1
    outcome(f"{mode} grey image (was nearly white)", "identical", "wrong result")


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_viewers_do(orientation, tmp_path, outcome):
    from PIL import ImageOps

    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # a red corner shows the turn
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    image.save(path, exif=exif, quality=95)
    pixels = decode_rgb(str(path), 32).permute(1, 2, 0).numpy().astype(int)
    with Image.open(path) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB")).astype(int)
    assert pixels.shape == expected.shape and np.abs(pixels - expected).mean() < 2
    outcome(f"JPEG with EXIF orientation {orientation}", "identical", "wrong result")


@pytest.mark.parametrize("size", [(65000, 2), (2, 30000), (9000, 9000)])
def test_image_bombs_are_flagged_before_decoding(size, tmp_path, outcome):
    path = tmp_path / "bomb.png"
    Image.new("1", size).save(path)  # 1 bit a pixel: a small file declaring many pixels
    start = time.perf_counter()
    assert check_image(path) == "oversized_image"
    assert time.perf_counter() - start < 2
    outcome(f"image of {size[0]}x{size[1]} pixels", "clean error", "poor")


# --- poor: bounded resources, one-line errors -------------------------------------------------------

def test_a_huge_text_file_is_read_only_to_its_bound(messy_data, outcome):
    items, _ = read_mvsa(messy_data)
    path = messy_data / "data" / f"{items[0].guid}.txt"
    path.write_bytes(b"word " * (10 * 2**20 // 5))  # 10 MB
    start = time.perf_counter()
    items, report = read_mvsa(messy_data)
    assert time.perf_counter() - start < 10
    item = items[0]
    assert "long_text" in item.flags and len(item.text.encode()) <= MAX_TEXT_BYTES
    outcome("10 MB post text", "clean error", "poor")


def test_a_memo_bomb_pickle_is_refused_before_it_expands(tmp_path, outcome):
    inner = [0.0] * 1000
    middle = [inner] * 1000
    bomb = {"train": {"text": [middle] * 1000, "labels": [0.0]}}  # 1e9 values by reference
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps(bomb))
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(DataError, match="expands to over"):
        import_features.run(path, tmp_path / "cache")
    assert time.perf_counter() - start < 10
    outcome("memo-bomb pickle (1e9 values from a few KB)", "clean error", "poor")


@pytest.mark.parametrize("edit", ["hidden 2e7", "weights of another shape"])
def test_a_spec_that_disagrees_with_its_weights_is_named_before_allocating(edit, signal_cache, tmp_path, outcome):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    state_dict, spec = rundir.load_model(run)
    if edit == "hidden 2e7":
        spec["hidden"] = 20_000_000
    else:
        name = next(k for k, v in state_dict.items() if v.ndim == 2)
        state_dict[name] = torch.zeros(state_dict[name].shape[0] + 1, state_dict[name].shape[1])
    with pytest.raises(rundir.RunDirError, match="do not fit together"):
        model_with_weights(spec, state_dict, run)
    outcome(f"model.json / weights mismatch: {edit}", "clean error", "poor")


BAD_OPTIONS = [
    (["--epochs", "-3"], "--epochs must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--dropout", "1.5"], "--dropout must be >= 0 and < 1"),
    (["--hidden", "0"], "--hidden must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--task", "regresion"], "did you mean regression"),
    (["--fusion", "gmuu"], "did you mean gmu"),
    (["--class-weights", "1,-1,2"], "--class-weights must be > 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_values_stop_before_any_file_is_written(args, message, signal_cache, tmp_path, outcome):
    out = tmp_path / "run"
    typed_in_process(["train-head", "--cache", str(signal_cache), "--out", str(out), *args], message)
    assert not out.exists() and not list(tmp_path.glob(".*lock"))
    outcome(f"train-head {' '.join(args)}", "clean error", "poor")


# Every command's bad inputs, as users typed them: one line, exit 2, nothing written under
# {out} nor in the cache (the cache's files compared before and after).
BAD_COMMANDS = [
    ("sweep --cache {cache} --fusion gmuu --out {out}", "did you mean gmu"),
    ("sweep --cache {cache} --modalities text --fusion concat,co-attn --out {out}", "co-attn needs 2 modalities"),
    ("sweep --cache {missing} --fusion gmu --out {out}", "no manifest"),
    ("sweep --cache {cache} --fusion gmu --seeds a --out {out}", "--seeds 'a': expected whole numbers"),
    ("sweep --cache {cache} --fusion gmu --grid lr=x --out {out}", "--grid 'lr=x': every value must be of type float"),
    ("sweep --cache {cache} --fusion gmu --grid lr=1e-3,-1 --out {out}", "--lr must be > 0"),
    ("sweep --cache {cache} --fusion gmu --workers 0 --out {out}", "--workers must be >= 1"),
    ("cache ls --cache {missing}", "no such cache directory"),
    ("extract --data {data} --cache {out} --modalities txt", "unknown modality 'txt'"),
    ("extract --data {missing} --cache {out}", "no train.txt here"),
    ("finetune --data {missing} --out {out}", "no train.txt here"),
    ("finetune --data {data} --fusion gmuu --out {out}", "did you mean gmu"),
    ("predict --run {missing}", "no such directory"),
    ("predict --run {run} --split tset", "did you mean test"),
    ("predict --run {run} --text hello --image {missing}.jpg", "no such file"),
    ("evaluate --run {cache}", "not a run directory"),
]


@pytest.mark.parametrize(("command", "message"), BAD_COMMANDS, ids=[c for c, _ in BAD_COMMANDS])
def test_every_command_s_bad_input_is_one_line_before_any_file(command, message, signal_cache, tmp_path, outcome):
    run = tmp_path / "run"
    if "{run}" in command:
        train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", out=run, epochs=1), log=lambda *_: None)
    before = tree(signal_cache), tree(run) if run.exists() else {}
    args = command.format(cache=signal_cache, data=signal_cache.parent / "data", out=tmp_path / "out",
                          missing=tmp_path / "missing", run=run).split()
    typed_in_process(args, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()
    assert (tree(signal_cache), tree(run) if run.exists() else {}) == before
    outcome(command.split(" --")[0] + ": " + message, "clean error", "poor")


def test_a_fusion_head_on_one_modality_trains_and_says_so(signal_cache, tmp_path):
    result = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="gmu", modalities=("text",), epochs=1,
                                            out=tmp_path / "run"), log=lambda *_: None)
    assert result.warnings[0].startswith("--fusion gmu fuses modalities but this run reads only text")
    result = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="linear", modalities=("text",), epochs=1,
                                            out=tmp_path / "linear"), log=lambda *_: None)
    assert not [w for w in result.warnings if "fuses" in w]


@pytest.mark.parametrize("content", ['["a", "list"]', '{"epochs": true}', '{"lora_rank": -2}'])
def test_a_bad_config_file_stops_before_work(content, signal_cache, tmp_path, outcome):
    config = tmp_path / "options.json"
    config.write_text(content)
    command = "finetune" if "lora" in content else "train-head"
    source = ["--data", tmp_path] if command == "finetune" else ["--cache", signal_cache]
    result = cli(command, "--config", config, *source, "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout
    assert not (tmp_path / "run").exists()
    outcome(f"--config holding {content}", "clean error", "poor")


def test_an_extract_batch_size_of_zero_writes_nothing(messy_data_source, tmp_path, outcome):
    with pytest.raises(ConfigError, match="--batch-size must be >= 1"):
        ExtractConfig(data=messy_data_source, cache=tmp_path / "cache", batch_size=0)
    result = cli("extract", "--data", messy_data_source, "--cache", tmp_path / "cache", "--batch-size", "0")
    one_line_error(result, "--batch-size must be >= 1")
    assert not (tmp_path / "cache").exists()
    outcome("extract --batch-size 0", "clean error", "poor")


@pytest.mark.parametrize("fault", ["NaN label", "score 100", "id twice in a split"])
def test_bad_imported_labels_are_named(fault, tmp_path, outcome):
    path = make_mosi_pickle(tmp_path / "mosi.pkl", sizes={"train": 8, "valid": 4, "test": 4})
    data = pickle.loads(path.read_bytes())
    if fault == "NaN label":
        data["valid"]["labels"][1] = np.nan
    elif fault == "score 100":
        data["train"]["labels"][3] = 100.0
    else:
        data["test"]["id"][2] = data["test"]["id"][0]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match="NaN or infinite|outside .-3, 3.|listed twice"):
        import_features.run(path, tmp_path / "cache")
    outcome(f"import with a {fault}", "clean error", "wrong result")


def test_an_mmsa_nan_label_is_named(tmp_path, outcome):
    from msa.data.demo import make_mmsa_pickle

    path = make_mmsa_pickle(tmp_path / "aligned_50.pkl", sizes={"train": 8, "valid": 4, "test": 4})
    data = pickle.loads(path.read_bytes())
    data["train"]["regression_labels"][0] = np.nan
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match="NaN or infinite"):
        import_features.run(path, tmp_path / "cache")
    outcome("MMSA file with a NaN label", "clean error", "wrong result")


@pytest.mark.parametrize("fusion", ["cross-attn", "co-attn"])
def test_a_two_modality_head_on_one_modality_is_named_before_the_run_dir(fusion, signal_cache, tmp_path, outcome):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"--fusion {fusion} needs 2 modalities"):
        train_head.run(TrainHeadConfig(cache=signal_cache, out=out, fusion=fusion, modalities=("text",), epochs=1))
    assert not out.exists()
    outcome(f"{fusion} on a text-only selection", "clean error", "poor")


@pytest.mark.parametrize("problem", ["a repeated header line", "a Latin-1 byte in a guid"])
def test_label_file_problems_name_file_and_line(problem, messy_data, outcome):
    path = messy_data / "train.txt"
    lines = path.read_bytes().splitlines()
    if problem == "a repeated header line":
        lines.insert(4, b"guid,tag")
    else:
        lines[3] = b"caf\xe9," + lines[3].split(b",")[1]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"train.txt:{5 if 'header' in problem else 4}: "):
        read_mvsa(messy_data)
    outcome(f"train.txt with {problem}", "clean error", "poor")


def read_only(path: Path):
    """A read-only bind mount over `path` (root only), or skip; root ignores file modes."""
    import contextlib

    @contextlib.contextmanager
    def mounted():
        if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot bind-mount here (needs root)")
        try:
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode != 0:
                pytest.skip("cannot remount read-only here")
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)

    return mounted()


def test_a_read_only_cache_is_read_and_named_for_writes(signal_cache, extract_config, tmp_path, outcome):
    import shutil

    cache = Path(shutil.copytree(signal_cache, tmp_path / "cache"))
    shutil.rmtree(cache / ".locks", ignore_errors=True)
    (cache / "features" / "leftover.h5.tmp").write_bytes(b"x")
    with read_only(cache):
        assert train_head.load_train_data(cache, (), False).manifest.guids  # readers work
        with pytest.raises(CacheError, match="not writable"):
            maintenance.collect(cache, dry_run=False)
        data = read_manifest(cache).info["data_dir"]
        result = cli("extract", "--data", data, "--cache", cache, "--text-model", extract_config().text_model,
                     "--modalities", "text", "--max-len", "16", "--precision", "fp32", "--no-progress")
        one_line_error(result, "not writable")
    outcome("read-only cache: extract and gc", "clean error", "poor")


def test_a_shard_left_after_a_merge_is_garbage(extract_config, tmp_path, outcome):
    cfg = extract_config(modalities=("lexicon",))
    for i in range(2):
        extract.run(extract_config(modalities=("lexicon",), shard=f"{i}/2"), show_progress=False)
    shards = sorted((cfg.cache / "features").glob("*.shard-*"))
    kept = shards[0].read_bytes()
    name = shards[0].name.split(".shard-")[0]
    merged = maintenance.merge_shards(cfg.cache, name)
    shards[0].write_bytes(kept)  # a copy restored, or a merge killed before it removed the shards
    assert any(f.path == shards[0] and "merged already" in f.reason for f in maintenance.garbage(cfg.cache))
    assert maintenance.merge_shards(cfg.cache, name) == merged and not shards[0].exists()
    outcome("a shard left beside its merged set", "clean error", "poor")


def test_predict_with_the_runs_own_cache_named(signal_cache, tmp_path, outcome):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    own, _ = predict.run(predict.PredictConfig(run=run), show_progress=False)
    expected = own.read_text()
    again, _ = predict.run(predict.PredictConfig(run=run, cache=signal_cache, out=tmp_path / "p.txt"),
                           show_progress=False)
    assert again.read_text() == expected
    outcome("predict --cache pointing at the run's own cache", "identical", "poor")


def test_a_new_data_folder_predicts_with_a_made_up_dataset(signal_cache, tmp_path):
    """Sanity of the fixtures above: a second data set still predicts (no false refusals)."""
    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    other = make_demo_dataset(tmp_path / "new", n_labelled=4, n_test=5, seed=7)
    path, predictions = predict.run(predict.PredictConfig(run=run, data=other), show_progress=False)
    assert len(predictions.guids) == 5 and path.is_file()
