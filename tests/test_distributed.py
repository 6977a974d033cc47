"""Stage 1 under torchrun: ranks share the work, rank 0 publishes (issue 15)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msa.cache.features import FeatureSet

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(ranks: int = 2) -> list[str]:
    """torchrun on a free port: two suites at once (or a stale rendezvous) must not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [str(TORCHRUN), "--nproc-per-node", str(ranks), "--master-port", str(port)]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_extract_on_two_cpu_ranks_gives_the_one_process_sets(extract_config, tmp_path):
    cfg = extract_config()
    options = ["-m", "msa", "-q", "extract", "--data", str(cfg.data), "--text-model", cfg.text_model, "--max-len", "16",
               "--image-model", cfg.image_model, "--image-weights", cfg.image_weights, "--batch-size", "8",
               "--precision", "fp32", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each: CPU kernels sum in another order with more
    for launcher, cache in (([sys.executable], "alone"),
                            (torchrun(), "ranks")):
        done = subprocess.run([*launcher, *options, "--cache", str(tmp_path / cache)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    features = tmp_path / "ranks" / "features"
    assert not list(features.glob("*shard*"))  # merged and removed by rank 0
    alone = sorted((tmp_path / "alone" / "features").glob("*.h5"))
    assert [p.name for p in alone] == sorted(p.name for p in features.glob("*.h5"))  # the same fingerprints
    for path in alone:
        for part in ("pooled", "tokens", "mask"):
            np.testing.assert_array_equal(FeatureSet.open(features / path.name).load(part),
                                          FeatureSet.open(path).load(part))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_a_rank_killed_mid_run_publishes_nothing_and_the_next_run_resumes(extract_config, tmp_path):
    cfg = extract_config()
    options = ["-q", "extract", "--data", str(cfg.data), "--cache", str(tmp_path / "cache"), "--text-model",
               cfg.text_model, "--max-len", "16", "--image-model", cfg.image_model, "--image-weights",
               cfg.image_weights, "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--modalities", "text"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = torchrun()
    killed = subprocess.run([*launch, str(Path(__file__).with_name("kill_rank_one.py")), *options],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode != 0
    features = tmp_path / "cache" / "features"
    assert not [p for p in features.glob("*.h5") if ".shard-" not in p.name]  # nothing published
    assert list(features.glob("*.shard-1-of-2.h5.partial"))  # the dead rank's share, left to resume
    again = subprocess.run([*launch, "-m", "msa", *options], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not list(features.glob("*shard*")) and len(list(features.glob("*.h5"))) == 1


def test_stages_that_do_not_share_work_refuse_to_run_under_torchrun(monkeypatch, signal_cache, tmp_path):
    from msa.core.config import ConfigError, TrainHeadConfig
    from msa.stages import train_head

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="msa train-head does not share its work across torchrun's 2 processes"):
        train_head.run(TrainHeadConfig(cache=signal_cache, out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_ddp_finetune_on_two_ranks_matches_one_process_with_the_same_global_batch_and_resumes(
        messy_data_source, tiny_models, tmp_path):
    from msa.core import rundir

    def command(out: Path) -> list[str]:
        return ["-q", "finetune", "--data", str(messy_data_source), "--out", str(out),
                "--text-model", tiny_models["text"], "--max-len", "16", "--image-model", "timm:test_efficientnet",
                "--image-weights", tiny_models["image_weights"], "--hidden", "16", "--dropout", "0",
                "--lora-rank", "2", "--unfreeze-text-layers", "0", "--unfreeze-image-stages", "0",
                "--lr-encoder", "1e-2", "--lr-fusion", "1e-2", "--lr-head", "1e-2", "--batch-size", "4",
                "--epochs", "2", "--patience", "5", "--device", "cpu", "--precision", "fp32",
                # 8 train items: every global batch of 4 splits evenly; 11 val items: two val
                # batches of 8 and 3, one for each rank to validate.
                "--limit", "19", "--val-ratio", "0.6"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = torchrun()
    stop = str(Path(__file__).with_name("stop_after_first_epoch.py"))
    for launcher, out in (([sys.executable, "-m", "msa"], "alone"), ([*launch, "-m", "msa"], "ranks"),
                          ([*launch, stop], "stopped")):
        done = subprocess.run([*launcher, *command(tmp_path / out)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert (done.returncode == 0) == (out != "stopped"), done.stdout + done.stderr
    # Rank 0 cannot claim a finished run directory: every rank stops at once, not at the group's timeout.
    refused = subprocess.run([*launch, "-m", "msa", *command(tmp_path / "ranks")], capture_output=True, text=True,
                             env=env, timeout=120)
    assert refused.returncode != 0 and "--overwrite" in refused.stdout + refused.stderr
    assert "rank 0 could not claim" in refused.stdout + refused.stderr
    # The stopped run (killed after epoch 1 on 2 ranks) resumes as one process: the state is world-size free.
    done = subprocess.run([sys.executable, "-m", "msa", "-q", "finetune", "--resume", str(tmp_path / "stopped")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    alone, _ = rundir.load_model(tmp_path / "alone")
    trained = [k for k in alone if "lora_" in k or k.startswith("head.")]
    assert trained
    want = pd.read_parquet(tmp_path / "alone" / rundir.VAL_PREDICTIONS)
    assert len(want) == 11
    for other in ("ranks", "stopped"):
        weights, _ = rundir.load_model(tmp_path / other)
        assert all(torch.allclose(alone[k], weights[k], atol=1e-5) for k in trained), other
        assert len((tmp_path / other / "history.csv").read_text().splitlines()) == 1 + 2
        # Validated in shares by the ranks, gathered in the one process's order.
        got = pd.read_parquet(tmp_path / other / rundir.VAL_PREDICTIONS)
        assert got["guid"].tolist() == want["guid"].tolist()
        probabilities = [c for c in want.columns if c.startswith("p_")]
        assert probabilities
        np.testing.assert_allclose(got[probabilities].to_numpy(), want[probabilities].to_numpy(), atol=1e-5)


def test_a_sweep_on_a_local_ray_cluster_gives_the_local_backend_s_results(signal_cache, tmp_path):
    pytest.importorskip("ray")
    from msa.core.config import SweepConfig, TrainHeadConfig
    from msa.stages import sweep

    base = TrainHeadConfig(cache=signal_cache, epochs=3)
    tables = {backend: sweep.run(SweepConfig(base=base, out=tmp_path / backend, fusions=("concat", "late"),
                                             seeds=(0, 1), workers=2, backend=backend), show_progress=False)
              for backend in ("local", "ray")}
    columns = ["run", "fusion", "seed", "accuracy", "macro_f1", "weighted_f1", "best_epoch"]
    assert len(tables["ray"]) == 4
    assert tables["ray"][columns].equals(tables["local"][columns])
    assert (tmp_path / "ray" / "results.csv").is_file()
    again = sweep.run(SweepConfig(base=base, out=tmp_path / "ray", fusions=("concat", "late"), seeds=(0, 1),
                                  workers=2, backend="ray"), show_progress=False)  # finished runs are skipped
    assert again[columns].equals(tables["ray"][columns])


def test_without_ray_the_ray_backend_says_how_to_install_it(signal_cache, tmp_path, monkeypatch):
    from msa.core.config import ConfigError, SweepConfig, TrainHeadConfig
    from msa.stages import sweep

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ConfigError, match='pip install "msa\\[ray\\]"'):
        sweep.run(SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=1), out=tmp_path / "s",
                              fusions=("concat",), seeds=(0,), backend="ray"), show_progress=False)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_caption_on_two_ranks_gives_the_one_process_captions(messy_data_source, tiny_models, tmp_path):
    from msa.cache.captions import CaptionSet, caption_dir, list_caption_sets

    options = ["-m", "msa", "-q", "caption", "--data", str(messy_data_source), "--model", tiny_models["captioner"],
               "--batch-size", "4", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, cache in (([sys.executable], "alone"),
                            (torchrun(), "ranks")):
        done = subprocess.run([*launcher, *options, "--cache", str(tmp_path / cache)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    (name,) = list_caption_sets(tmp_path / "alone")
    assert list_caption_sets(tmp_path / "ranks") == [name]
    assert not list(caption_dir(tmp_path / "ranks").glob("*.partial.jsonl"))  # the parts were folded in
    alone, ranks = CaptionSet.load(tmp_path / "alone", name), CaptionSet.load(tmp_path / "ranks", name)
    assert len(alone.captions) > 30 and ranks.captions == alone.captions  # every listed image, bad ones too
