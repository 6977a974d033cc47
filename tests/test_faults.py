"""The fault suite: every way the cache and the runs were seen to lose data, injected for real.

Each test records the fault it injects and how it ended (`identical` to an undisturbed run,
or a `clean error`: a one-line message, nothing published or overwritten that is wrong).
A failing test is a fault that lost data. `python bench/faults.py` runs this file and
prints the table: fault, runs, identical, clean error, lost.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from msa.cache import maintenance, writer
from msa.cache.captions import CaptionSet
from msa.cache.features import FeatureSet, feature_path, partial_path
from msa.cache.manifest import read_manifest
from msa.core import rundir
from msa.core.compute import CPU_BF16_ENV, resolve_compute
from msa.core.config import CaptionConfig, FinetuneConfig, PredictConfig, SweepConfig, TrainHeadConfig
from msa.core.errors import BusyError, CacheError, WriteError
from msa.core.locks import set_lock
from msa.data.demo import make_demo_dataset
from msa.data.mvsa import DataError, read_mvsa
from msa.stages import caption, extract, finetune, import_features, predict, sweep, train_head
from msa.training import plots

PARTS = ("pooled", "tokens", "mask")


def cli(*args, cwd: Path | None = None, file_size_limit: int | None = None, **popen) -> subprocess.CompletedProcess:
    """`python -m msa.cli ARGS` in a real process, its output (stdout and stderr) in .stdout;
    file_size_limit: every write past that many bytes of a file fails (EFBIG), as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "msa.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          cwd=cwd, preexec_fn=limit if file_size_limit else None, env={**os.environ, "COLUMNS": "200"},
                          **popen)


def extract_args(cfg, *extra) -> list[str]:
    return ["extract", "--data", cfg.data, "--cache", cfg.cache, "--text-model", cfg.text_model, "--max-len", "16",
            "--image-model", cfg.image_model, "--image-weights", cfg.image_weights, "--batch-size", "4",
            "--precision", "fp32", "--no-progress", *extra]


def published(cache: Path) -> dict[str, FeatureSet]:
    sets = [FeatureSet.open(p) for p in sorted((Path(cache) / "features").glob("*.h5"))]
    return {fs.fingerprint["modality"]: fs for fs in sets}


def assert_same_sets(cache: Path, reference: Path, all_of_them: bool = True) -> None:
    """Every set of `reference` is in `cache` under the same name, with the same numbers
    (all_of_them=False: whatever `cache` published so far is)."""
    mine, theirs = published(cache), published(reference)
    assert mine.keys() == theirs.keys() if all_of_them else mine.keys() <= theirs.keys()
    for modality in mine:
        expected = theirs[modality]
        assert mine[modality].name == expected.name
        for part in PARTS:
            np.testing.assert_array_equal(mine[modality].load(part), expected.load(part))


@pytest.fixture
def reference(extract_config, tmp_path_factory) -> Path:
    """An undisturbed extract of the same data with the same options."""
    cfg = extract_config(cache=tmp_path_factory.mktemp("reference") / "cache", batch_size=4)
    extract.run(cfg, show_progress=False)
    return cfg.cache


# --- a full disk -----------------------------------------------------------------------------------

@pytest.mark.parametrize("share", [0.2, 0.5, 0.9])
def test_full_disk_mid_extract_publishes_nothing_and_resumes_identical(share, extract_config, reference, outcome):
    cfg = extract_config(batch_size=4)
    biggest = max(p.stat().st_size for p in (reference / "features").glob("*.h5"))
    failed = cli(*extract_args(cfg), file_size_limit=int(biggest * share))
    assert failed.returncode == 2, failed.stdout + failed.stderr  # not 0, not a segfault
    assert "write failed: the file reached the size limit" in failed.stdout and ".h5.partial" in failed.stdout
    assert "Traceback" not in failed.stdout
    assert len(published(cfg.cache)) < 2
    assert_same_sets(cfg.cache, reference, all_of_them=False)  # what was published is whole
    again = cli(*extract_args(cfg))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_sets(cfg.cache, reference)
    outcome(f"full disk (write limit at {share:.0%} of a set) during extract", "clean error")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (root only), or skip."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs is Linux's")
def test_real_full_disk_on_a_small_tmpfs(extract_config, reference, tmp_path, outcome):
    """ENOSPC from the kernel: the preflight check or the write itself stops extract cleanly."""
    with tmpfs(tmp_path / "small", "160k"):
        cfg = extract_config(cache=tmp_path / "small" / "cache", batch_size=4)
        failed = cli(*extract_args(cfg))
        assert failed.returncode == 2, failed.stdout + failed.stderr
        assert "free" in failed.stdout and "error:" in failed.stdout
        assert_same_sets(cfg.cache, reference, all_of_them=False)
        moved = tmp_path / "big"
        shutil.copytree(cfg.cache, moved)
    again = cli(*extract_args(extract_config(cache=moved, batch_size=4)))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_sets(moved, reference)
    outcome("full disk (ENOSPC, 160 kB tmpfs) during extract", "clean error")


def test_not_enough_space_is_said_before_encoding(extract_config, monkeypatch, outcome):

    monkeypatch.setattr(writer, "free_bytes", lambda path: 1000)
    with pytest.raises(WriteError, match="needs ~0 MB and only 0 MB are free there"):
        extract.run(extract_config(), show_progress=False)
    assert not list((extract_config().cache / "features").glob("*.h5*"))
    outcome("too little free space before extract", "clean error")


# --- two processes ---------------------------------------------------------------------------------

def test_a_set_being_written_elsewhere_is_left_alone(extract_config, reference, outcome):
    """A real second process finds the text set locked: it says so, extracts the image set,
    exits 3, and touches nothing of the other writer's."""
    cfg = extract_config(batch_size=4)
    text_name = next(fs.name for m, fs in published(reference).items() if m == "text")
    lock = set_lock(cfg.cache, text_name)
    try:
        other = cli(*extract_args(cfg))
    finally:
        lock.release()
    assert other.returncode == 3, other.stdout + other.stderr
    assert f"another process is writing {text_name}" in other.stdout
    assert set(published(cfg.cache)) == {"image"}
    assert not partial_path(feature_path(cfg.cache, text_name)).exists()
    assert cli(*extract_args(cfg)).returncode == 0
    assert_same_sets(cfg.cache, reference)
    outcome("second extract while a set is being written", "clean error")


def test_two_extracts_at_once_end_identical(extract_config, reference, outcome):
    cfg = extract_config(batch_size=4)
    processes = [subprocess.Popen([sys.executable, "-m", "msa.cli", *map(str, extract_args(cfg))],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in processes]
    outputs = [p.stdout.read() for p in processes]
    assert all(code in (0, 3) for code in codes), outputs  # 3: the other process had a set
    assert "Traceback" not in "".join(outputs)
    if 3 in codes:
        assert cli(*extract_args(cfg)).returncode == 0
    assert_same_sets(cfg.cache, reference)
    outcome("two extracts on one cache at once", "identical")


def test_second_captioner_of_a_set_is_refused(messy_data_source, tiny_models, tmp_path, outcome):
    cfg = CaptionConfig(data=messy_data_source, cache=tmp_path / "cache", model=tiny_models["captioner"],
                        batch_size=4, device="cpu", limit=6)
    name = caption.run(cfg, show_progress=False).name
    lock = set_lock(cfg.cache, name)
    try:
        with pytest.raises(BusyError, match=f"another process is writing {name}"):
            caption.run(dataclasses_replace(cfg, limit=None), show_progress=False)
    finally:
        lock.release()
    assert caption.run(dataclasses_replace(cfg, limit=None), show_progress=False).captioned > 0
    outcome("second caption run on one caption set", "clean error")


def test_full_disk_mid_caption_keeps_whole_lines_and_resumes_identical(messy_data_source, tiny_models, tmp_path,
                                                                        outcome):
    cfg = CaptionConfig(data=messy_data_source, cache=tmp_path / "cache", model=tiny_models["captioner"],
                        batch_size=4, device="cpu")
    expected = caption.run(dataclasses_replace(cfg, cache=tmp_path / "reference"), show_progress=False)
    args = ["caption", "--data", cfg.data, "--cache", cfg.cache, "--model", cfg.model, "--batch-size", "4",
            "--device", "cpu", "--no-progress"]
    failed = cli(*args, file_size_limit=1500)
    assert failed.returncode == 2 and "write failed: the file reached the size limit" in failed.stdout, failed.stdout
    assert "Traceback" not in failed.stdout
    again = cli(*args)
    assert again.returncode == 0, again.stdout
    resumed = CaptionSet.load(cfg.cache, expected.name)
    assert {g: c.text for g, c in resumed.captions.items()} == {g: c.text for g, c in
                                                                 expected.caption_set.captions.items()}
    outcome("full disk (write limit) during caption", "clean error")


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# --- damage on disk --------------------------------------------------------------------------------

def flip_a_byte(path: Path, part: str) -> None:
    """Flip one bit in the middle of the first stored chunk of `part`."""
    with h5py.File(path, "r") as f:
        info = f[part].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("part", ["pooled", "tokens"])
def test_a_flipped_bit_is_named_never_used(part, signal_cache, tmp_path, outcome):
    cache = Path(shutil.copytree(signal_cache, tmp_path / "cache"))
    image = published(cache)["image"]
    flip_a_byte(image.path, part)
    with pytest.raises(CacheError, match=f"{image.name} is damaged in '{part}'.*msa cache rm {image.name}"):
        train_head.run(TrainHeadConfig(cache=cache, fusion="cross-attn" if part == "tokens" else "concat",
                                       out=tmp_path / "run", epochs=1))
    assert not (tmp_path / "run").exists()
    (verdict,) = [f for f in maintenance.verify(cache) if f.path == image.path]
    assert verdict.reason.startswith("damaged on disk: a chunk fails its checksum")
    outcome(f"one flipped bit in a published set's {part}", "clean error")


def test_damaged_sets_are_re_encoded_by_extract(extract_config, reference, outcome):
    cfg = extract_config(batch_size=4)
    extract.run(cfg, show_progress=False)
    sets = published(cfg.cache)
    os.truncate(sets["text"].path, sets["text"].path.stat().st_size // 2)
    with pytest.raises(CacheError, match="unreadable.*msa cache rm"):
        train_head.run(TrainHeadConfig(cache=cfg.cache, out=cfg.cache.parent / "run", epochs=1))
    result = extract.run(cfg, show_progress=False)
    assert result.feature_sets["text"].status == "encoded" and result.feature_sets["image"].cached
    assert_same_sets(cfg.cache, reference)
    assert any("damaged" in f.reason for f in maintenance.garbage(cfg.cache))  # the set-aside file
    outcome("truncated published set", "identical")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_partial_is_set_aside_and_started_again(damage, extract_config, reference, outcome):
    cfg = extract_config(batch_size=4, modalities=("image",))
    calls = []

    def stop(modality, rows):
        calls.append(rows)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg, show_progress=False, on_batch=stop)
    (partial,) = (cfg.cache / "features").glob("*.partial")
    if damage == "truncated":
        os.truncate(partial, partial.stat().st_size // 3)
    else:
        partial.write_bytes(os.urandom(4096))
    extract.run(extract_config(batch_size=4), show_progress=False)
    assert_same_sets(cfg.cache, reference)
    outcome(f"{damage} partial set", "identical")


def test_a_truncated_manifest_is_named_and_rebuilt(extract_config, reference, outcome):
    cfg = extract_config(batch_size=4)
    extract.run(cfg, show_progress=False)
    manifest = cfg.cache / "manifest.parquet"
    os.truncate(manifest, manifest.stat().st_size // 2)
    listing = cli("cache", "ls", "--cache", cfg.cache)
    assert listing.returncode == 0 and "manifest is unreadable" in listing.stdout and "complete" in listing.stdout
    with pytest.raises(CacheError, match="manifest is unreadable.*rerun `msa extract`"):
        train_head.run(TrainHeadConfig(cache=cfg.cache, out=cfg.cache.parent / "run", epochs=1))
    result = extract.run(cfg, show_progress=False)
    assert all(r.cached for r in result.feature_sets.values())
    assert read_manifest(cfg.cache).manifest_id == read_manifest(reference).manifest_id
    outcome("truncated manifest.parquet", "identical")


def test_extract_killed_hard_resumes_identical(extract_config, reference, outcome):
    cfg = extract_config(batch_size=4)
    script = (f"import os, signal\nfrom msa.stages import extract\nfrom msa.core.config import ExtractConfig\n"
              f"cfg = ExtractConfig(**{ {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()} !r})\n"
              "n = []\n"
              "def kill(modality, rows):\n    n.append(rows)\n"
              "    if len(n) == 9: os.kill(os.getpid(), signal.SIGKILL)\n"
              "extract.run(cfg, show_progress=False, on_batch=kill)\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    extract.run(cfg, show_progress=False)
    assert_same_sets(cfg.cache, reference)
    outcome("kill -9 of extract", "identical")


# --- a modality dropped silently -------------------------------------------------------------------

def test_a_stale_modality_fails_the_run_naming_it(extract_config, tmp_path, outcome):
    cfg = extract_config()
    image = extract.run(cfg, show_progress=False).feature_sets["image"].name
    extract.run(extract_config(val_ratio=0.3, modalities=("text",)), show_progress=False)
    with pytest.raises(CacheError, match=f"no usable image features: .*{image} was extracted for another manifest"
                                         ".*--modalities text"):
        train_head.run(TrainHeadConfig(cache=cfg.cache, fusion="gmu", out=tmp_path / "run", epochs=1))
    result = train_head.run(TrainHeadConfig(cache=cfg.cache, fusion="text-only", modalities=("text",),
                                            out=tmp_path / "text", epochs=1))
    assert rundir.read_json(result.run_dir / "config.json")["modalities_used"] == ["text"]
    outcome("stale image set after re-extracting text with another split", "clean error")


def test_features_naming_one_modality_do_not_drop_the_other(signal_cache, tmp_path, outcome):
    """--features picks sets, not modalities: the run still reads every modality of the cache,
    and names them; leaving one out takes --modalities."""
    image = published(signal_cache)["image"].name
    named = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", features=(image,),
                                           out=tmp_path / "named", epochs=2))
    default = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", out=tmp_path / "default", epochs=2))
    assert rundir.read_json(named.run_dir / "config.json")["modalities_used"] == ["text", "image"]
    assert named.metrics["macro_f1"] == default.metrics["macro_f1"]
    with pytest.raises(ValueError, match="--features names a image set, but the run reads text"):
        train_head.run(TrainHeadConfig(cache=signal_cache, features=(image,), modalities=("text",),
                                       out=tmp_path / "text", epochs=1))
    outcome("--features naming only the image set", "identical")


# --- files that could run code ---------------------------------------------------------------------

class Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_not_run(tmp_path, outcome):
    marker = tmp_path / "ran"
    path = tmp_path / "features.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": {"text": Planted(marker)}}, f)
    with pytest.raises(DataError, match="asks for posix.system"):
        import_features.run(path, tmp_path / "cache")
    assert not marker.exists()
    outcome("planted __reduce__ in an import-features pickle", "clean error", "code ran")


def test_a_planted_resume_state_is_refused_not_run(messy_data_source, tiny_models, tmp_path, outcome):
    cfg = FinetuneConfig(data=messy_data_source, out=tmp_path / "ft", text_model=tiny_models["text"], max_len=16,
                         image_model="timm:test_efficientnet", image_weights=tiny_models["image_weights"], hidden=16,
                         epochs=1, batch_size=8, device="cpu", precision="fp32")
    finetune.run(cfg, show_progress=False, log=lambda *_: None)
    marker = tmp_path / "ran"
    torch.save({"model": Planted(marker)}, cfg.out / finetune.LAST)
    with pytest.raises(rundir.RunDirError, match="not a checkpoint msa can load safely"):
        finetune.run(cfg, resume=True, show_progress=False, log=lambda *_: None)
    assert not marker.exists()
    outcome("planted __reduce__ in finetune's resume state", "clean error", "code ran")


def test_a_planted_legacy_checkpoint_is_never_loaded(signal_cache, tmp_path, outcome):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    marker = tmp_path / "ran"
    (run / "model.safetensors").unlink()
    torch.save({"state_dict": Planted(marker)}, run / "checkpoint.pt")
    with pytest.raises(rundir.RunDirError, match="msa < 0.2 .*no longer reads it"):
        predict.run(PredictConfig(run=run, split="val"), show_progress=False)
    assert not marker.exists()
    outcome("planted checkpoint.pt in a shared run directory", "clean error", "code ran")


def test_damaged_weights_are_a_clean_error(signal_cache, tmp_path, outcome):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    weights = run / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(rundir.RunDirError, match="model.safetensors: unreadable"):
        predict.run(PredictConfig(run=run, split="val"), show_progress=False)
    outcome("truncated model weights", "clean error")


# --- paths -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("guid", ["../../x", "/abs/x", ".hidden", "a\\b"])
def test_a_guid_that_is_a_path_is_a_file_line_error(guid, messy_data, outcome):
    with open(messy_data / "train.txt", "a") as f:
        f.write(f"{guid},positive\n")
    lines = (messy_data / "train.txt").read_text().splitlines()
    with pytest.raises(DataError, match=rf"train.txt:{len(lines)}: guid .* is not a plain file name"):
        read_mvsa(messy_data)
    outcome(f"guid {guid!r} in train.txt", "clean error", "read outside")


def test_model_paths_are_resolved_and_fingerprinted_by_content(extract_config, tiny_models, tmp_path, outcome):
    """A relative spelling and a symlink of one model folder are one model: no second encode, and
    the recorded path works from any directory."""
    cfg = extract_config(modalities=("text",))
    first = extract.run(cfg, show_progress=False).feature_sets["text"]
    link = tmp_path / "links" / Path(tiny_models["text"]).name
    link.parent.mkdir()
    link.symlink_to(tiny_models["text"])
    cwd = os.getcwd()
    os.chdir(link.parent)
    try:
        for spelling in (link.name, f"./{link.name}/", os.path.relpath(tiny_models["text"])):
            again = extract.run(extract_config(modalities=("text",), text_model=spelling), show_progress=False)
            assert again.feature_sets["text"].name == first.name and again.feature_sets["text"].cached
    finally:
        os.chdir(cwd)
    recorded = FeatureSet.open(first.path).notes["extract_config"]["text_model"]
    assert recorded == str(Path(tiny_models["text"]).resolve())
    outcome("relative or symlinked text model path", "identical")


# --- outputs ---------------------------------------------------------------------------------------

def test_finetune_into_a_cache_is_refused(signal_cache, messy_data_source, tiny_models, tmp_path, outcome):
    cache = Path(shutil.copytree(signal_cache, tmp_path / "cache"))
    before = (cache / "manifest.parquet").read_bytes()
    cfg = FinetuneConfig(data=messy_data_source, out=cache, text_model=tiny_models["text"], max_len=16,
                         image_model="timm:test_efficientnet", image_weights=tiny_models["image_weights"],
                         device="cpu", precision="fp32")
    with pytest.raises(rundir.RunDirError, match="not empty and not an msa run directory"):
        finetune.run(cfg, show_progress=False, log=lambda *_: None, overwrite=True)
    assert (cache / "manifest.parquet").read_bytes() == before
    outcome("finetune --out pointing at a cache", "clean error")


def test_train_head_never_reuses_a_run_directory_silently(signal_cache, tmp_path, outcome):
    cfg = TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)
    first = train_head.run(cfg)
    weights = (first.run_dir / "model.safetensors").read_bytes()
    with pytest.raises(rundir.RunDirError, match="holds a finished train-head run; pass --overwrite"):
        train_head.run(dataclasses_replace(cfg, seed=1))
    assert (first.run_dir / "model.safetensors").read_bytes() == weights
    train_head.run(dataclasses_replace(cfg, seed=1), overwrite=True)
    assert rundir.read_json(first.run_dir / "config.json")["seed"] == 1
    outcome("train-head --out onto a finished run", "clean error")


def test_predict_never_overwrites_a_file(signal_cache, tmp_path, outcome):
    run = train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=1)).run_dir
    data = Path(read_manifest(signal_cache).info["data_dir"])
    precious = tmp_path / "train.txt"
    shutil.copy(data / "train.txt", precious)
    with pytest.raises(rundir.RunDirError, match="exists; pass --overwrite"):
        predict.run(PredictConfig(run=run, out=precious), show_progress=False)
    assert precious.read_bytes() == (data / "train.txt").read_bytes()
    own, _ = predict.run(PredictConfig(run=run), show_progress=False)
    own_text = own.read_text()
    other = make_demo_dataset(tmp_path / "new", n_labelled=4, n_test=5, seed=7)
    new, _ = predict.run(PredictConfig(run=run, data=other), show_progress=False)
    assert new != own and own.read_text() == own_text
    outcome("predict --out onto an existing file / new data onto the run's predictions", "clean error")


def test_two_sweeps_into_one_directory(signal_cache, tmp_path, outcome):
    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=1), out=tmp_path / "sweep", seeds=(0, 1))
    lock = rundir.lock_run(cfg.out)
    try:
        with pytest.raises(BusyError, match="another process is writing the run directory"):
            sweep.run(cfg, show_progress=False)
    finally:
        lock.release()
    table = sweep.run(cfg, show_progress=False)
    for run in table.run:
        history = rundir.read_history(cfg.out / run)
        assert [int(r["epoch"]) for r in history] == [1]  # no interleaved rows
    outcome("two sweeps into one --out", "clean error")


def test_killed_sweep_leaves_no_worker_and_resumes(signal_cache, tmp_path, outcome):
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", signal_cache, "--fusion", "concat,late", "--seeds", "0,1,2", "--epochs", "3",
            "--workers", "2", "--out", out, "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "msa.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/history.csv")):
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert children and not alive, f"workers still running after the sweep was killed: {alive}"
    finished = sweep.run(SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=3), out=out,
                                     fusions=("concat", "late"), seeds=(0, 1, 2)), show_progress=False)
    assert len(finished) == 6 and finished.run.is_unique
    for run in finished.run:
        assert [int(r["epoch"]) for r in rundir.read_history(out / run)] == [1, 2, 3]
    outcome("kill -9 of sweep --workers 2", "identical")


def test_a_killed_run_is_never_counted_finished(signal_cache, tmp_path, outcome, monkeypatch):
    cfg = TrainHeadConfig(cache=signal_cache, out=tmp_path / "run", epochs=2)

    def killed_while_plotting(run_dir, metrics):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_run", killed_while_plotting)
    with pytest.raises(KeyboardInterrupt):
        train_head.run(cfg)
    assert not rundir.is_finished(cfg.out)
    monkeypatch.undo()
    train_head.run(cfg, overwrite=True)
    assert rundir.is_finished(cfg.out) and (cfg.out / "curves.png").is_file()
    outcome("run killed after training, before its plots", "clean error")


# --- bad items ---------------------------------------------------------------------------------------

def test_conflicting_duplicate_stops_and_bad_items_are_listed(messy_data, extract_config, outcome):
    lines = (messy_data / "train.txt").read_text().splitlines()
    guid, label = lines[2].split(",")
    other = "negative" if label.strip().lower() != "negative" else "positive"
    (messy_data / "train.txt").write_text("\n".join([*lines, f"{guid},{other}"]) + "\n")
    with pytest.raises(DataError, match=rf"train.txt:{len(lines) + 1}: guid {guid} is listed again .*--on-duplicate"):
        extract.run(extract_config(data=messy_data), show_progress=False)
    cfg = extract_config(data=messy_data, on_duplicate="first")
    extract.run(cfg, show_progress=False)
    listed = pd.read_csv(cfg.cache / "bad_items.csv", dtype=str)
    duplicate = listed[listed["where"] == f"{messy_data / 'train.txt'}:{len(lines) + 1}"]
    assert duplicate.guid.tolist() == [guid] and duplicate.problem.str.contains("conflicting label").all()
    assert {"missing_image", "corrupt_image", "empty_text"} <= set(listed.problem)
    assert listed["where"].str.match(r".*(train|test_without_label)\.txt:\d+$").all()
    outcome("duplicate guid with a conflicting label", "clean error")


def test_a_failed_model_load_leaves_nothing(extract_config, tmp_path, outcome):
    with pytest.raises(Exception, match="no-such-model|not found|does not exist"):
        extract.run(extract_config(text_model=str(tmp_path / "no-such-model"), modalities=("text",)),
                    show_progress=False)
    assert not list((extract_config().cache / "features").glob("*.h5*"))
    outcome("text model that fails to load", "clean error")


# --- every CPU class ---------------------------------------------------------------------------------

@pytest.mark.parametrize("native_bf16", ["0", "1"])
def test_auto_precision_follows_the_cpu_class(native_bf16, extract_config, monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, native_bf16)
    assert resolve_compute("cpu", "auto").precision == ("bf16" if native_bf16 == "1" else "fp32")
    result = extract.run(extract_config(precision="auto", modalities=("text",)), show_progress=False)
    recorded = FeatureSet.open(result.feature_sets["text"].path).fingerprint["precision"]
    assert recorded == ("bf16" if native_bf16 == "1" else "fp32")
