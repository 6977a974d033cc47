"""The command line, driven through typer's CliRunner, and the encoders' real loading code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import h5py
import pandas as pd
import pytest
from typer.testing import CliRunner

from msa.cache.features import FeatureSet
from msa.cli import app
from msa.data.demo import make_tiny_image_weights
from msa.models.image import build_image_encoder
from msa.models.text import EncoderLoadError, TextEncoder

runner = CliRunner(env={"COLUMNS": "200"})  # rich tables truncate cells at the default 80


def extract_args(data, cache, tiny_models, *extra) -> list[str]:
    return ["extract", "--data", str(data), "--cache", str(cache), "--text-model", tiny_models["text"],
            "--max-len", "16", "--image-model", "timm:test_efficientnet",
            "--image-weights", tiny_models["image_weights"], "--batch-size", "8", "--no-progress", *extra]


def test_extract_ls_info(messy_data_source, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    result = runner.invoke(app, extract_args(messy_data_source, cache, tiny_models))
    assert result.exit_code == 0, result.output
    assert "Data: 37 items" in result.output
    assert "corrupt_image 2" in result.output and "gb18030 1" in result.output
    assert result.output.count("encoded") >= 2

    again = runner.invoke(app, extract_args(messy_data_source, cache, tiny_models))
    assert again.output.count("│ cached ") == 2

    # On stdout, one line per file with its full name, for pipes; the legend goes to stderr.
    listing = runner.invoke(app, ["cache", "ls", "--cache", str(cache)])
    assert listing.exit_code == 0
    lines = listing.stdout.splitlines()
    assert "37 items" in lines[0] and len(lines) == 3
    files = sorted(p.name for p in (cache / "features").glob("*.h5"))
    assert sorted(line.split("\t")[0] for line in lines[1:]) == files
    assert all(line.split("\t")[1] == "complete" for line in lines[1:])
    listed = json.loads(runner.invoke(app, ["cache", "ls", "--json", "--cache", str(cache)]).stdout)
    assert listed["manifest"]["items"] == 37 and sorted(f["file"] for f in listed["feature_files"]) == files

    name = next((cache / "features").glob("text-*.h5")).name
    info = runner.invoke(app, ["cache", "info", name, "--cache", str(cache)])
    assert info.exit_code == 0
    described = json.loads(info.output)
    assert described["shapes"]["tokens"] == [37, 16, 32]
    assert described["fingerprint"]["max_len"] == 16
    assert described["model"] == tiny_models["text"]  # the fingerprint's "local" is where it was read from
    narrow = CliRunner(env={"COLUMNS": "60"}).invoke(app, extract_args(messy_data_source, cache, tiny_models))
    assert f"text: {name.removesuffix('.h5')}" in narrow.stdout.splitlines()  # whole, whatever the width


def test_bad_data_is_one_clear_line_not_a_traceback(messy_data, tiny_models, tmp_path):
    (messy_data / "train.txt").write_text("guid,tag\n1,positive\n2,meh\n")
    result = runner.invoke(app, extract_args(messy_data, tmp_path / "cache", tiny_models))
    assert result.exit_code == 2
    assert "error:" in result.output and "train.txt:3: label 'meh'" in result.output
    assert "Traceback" not in result.output


def test_quiet_still_prints_the_error(tmp_path):
    result = runner.invoke(app, ["-q", "train-head", "--cache", str(tmp_path / "no-cache")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no manifest" in result.output


def test_missing_model_says_what_to_pass(messy_data_source, tiny_models, tmp_path):
    args = extract_args(messy_data_source, tmp_path / "cache", tiny_models)
    args[args.index("--text-model") + 1] = str(tmp_path / "no-such-model")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "could not load text model" in result.output and "local Hugging Face model directory" in result.output


def test_unknown_image_model_and_wrong_weights(tiny_models):
    with pytest.raises(EncoderLoadError, match="unknown image model 'resnet5000'"):
        build_image_encoder("resnet5000")
    with pytest.raises(EncoderLoadError, match="does not fit this model"):
        build_image_encoder("resnet18", tiny_models["image_weights"])
    with pytest.raises(EncoderLoadError, match="no such file"):
        build_image_encoder("resnet18", "/nonexistent/weights.pth")


def test_torchvision_encoder_from_a_local_state_dict(tmp_path):
    weights = make_tiny_image_weights(tmp_path / "resnet18.pth", "resnet18")
    encoder = build_image_encoder("resnet18", str(weights))
    assert encoder.preprocess.crop == 224 and encoder.preprocess.resize == 256
    import torch

    with torch.inference_mode():
        tokens, pooled = encoder(torch.zeros(2, 3, 224, 224))
    assert tokens.shape == (2, 49, 512) and pooled.shape == (2, 512)  # 7x7 map of layer4


def test_text_encoder_cls_pooling(tiny_models):
    import torch

    encoder = TextEncoder(tiny_models["text"], max_len=8, pooling="cls")
    ids = encoder.tokenize(["happy day with my friends today at the street", "sad"])
    assert max(len(x) for x in ids) == 8  # truncated to max_len, special tokens kept
    input_ids, mask = encoder.collate(ids)
    with torch.inference_mode():
        tokens, pooled = encoder(input_ids, mask)
    assert torch.equal(pooled, tokens[:, 0])


KILL_AFTER_THREE_BATCHES = """
import os, signal, sys
from msa.core.config import ExtractConfig
from msa.stages import extract
cfg = ExtractConfig(data=sys.argv[1], cache=sys.argv[2], text_model=sys.argv[3], max_len=16,
                    image_model="timm:test_efficientnet", image_weights=sys.argv[4], batch_size=2,
                    modalities=("image",))
batches = []
def kill(modality, n_rows):
    batches.append(n_rows)
    if len(batches) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
extract.run(cfg, show_progress=False, on_batch=kill)
"""


def test_extract_killed_hard_resumes(messy_data_source, tiny_models, tmp_path):
    """SIGKILL after three batches (no Python cleanup at all), then resume to a complete set."""
    cache = tmp_path / "cache"
    process = subprocess.run([sys.executable, "-c", KILL_AFTER_THREE_BATCHES, str(messy_data_source), str(cache),
                              tiny_models["text"], tiny_models["image_weights"]], capture_output=True)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert not list((cache / "features").glob("*.h5"))  # nothing published as complete
    (partial,) = (cache / "features").glob("*.h5.partial")
    with h5py.File(partial, "r") as f:
        assert f["done"][:].sum() == 6

    result = runner.invoke(app, extract_args(messy_data_source, cache, tiny_models, "--modalities", "image"))
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    finished = FeatureSet.open(next((cache / "features").glob("*.h5")))
    assert finished.shapes["pooled"][0] == 37


def test_cache_verify_rm_and_gc(messy_data_source, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    assert runner.invoke(app, extract_args(messy_data_source, cache, tiny_models)).exit_code == 0
    verified = runner.invoke(app, ["cache", "verify", "--cache", str(cache)])
    assert verified.exit_code == 0 and "2 sets verified" in verified.output
    text_set = next((cache / "features").glob("text-*.h5"))
    with h5py.File(text_set, "r") as f:
        chunk = f["tokens"].id.get_chunk_info(0)
    with open(text_set, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 1]))
    damaged = runner.invoke(app, ["cache", "verify", "--cache", str(cache)])
    assert damaged.exit_code == 1 and f"DAMAGED {text_set.name}" in damaged.output
    name = text_set.name.removesuffix(".h5")
    removed = runner.invoke(app, ["cache", "rm", name, "--cache", str(cache)])
    assert removed.exit_code == 0 and not text_set.exists()
    assert runner.invoke(app, ["cache", "rm", name, "--cache", str(cache)]).exit_code == 2  # nothing left to remove

    # Another split: the image set of the old manifest is stale, and gc removes it (a dry run first).
    other = runner.invoke(app, extract_args(messy_data_source, cache, tiny_models, "--val-ratio", "0.3",
                                            "--modalities", "text"))
    assert other.exit_code == 0, other.output
    (image_set,) = (cache / "features").glob("image-*.h5")
    dry = runner.invoke(app, ["cache", "gc", "--dry-run", "--cache", str(cache)])
    assert f"would remove {image_set}: stale" in dry.output and image_set.exists()
    collected = runner.invoke(app, ["cache", "gc", "--cache", str(cache)])
    assert f"removed {image_set}: stale" in collected.output and not image_set.exists()
    assert len(list((cache / "features").glob("text-*.h5"))) == 1  # the current set stays


def test_version_and_quiet():
    from msa import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"msa {__version__}"


def test_choices_are_typed_and_listed(messy_data_source, tiny_models, tmp_path):
    help_text = runner.invoke(app, ["extract", "--help"]).output
    flat = " ".join(help_text.replace("│", " ").split())
    assert "One of: mean, cls." in flat and "first-if-same" in flat
    bad = runner.invoke(app, extract_args(messy_data_source, tmp_path / "cache", tiny_models, "--pooling", "max"))
    assert bad.exit_code == 2 and "--pooling must be one of mean, cls, got 'max'" in bad.output
    assert not (tmp_path / "cache").exists()
    depth = runner.invoke(app, ["train-head", "--cache", str(tmp_path / "cache"), "--unfreeze-text-layers", "most"])
    assert depth.exit_code == 2 and "a layer count is a number or 'all', got 'most'" in depth.output


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_file_gives_options_and_the_command_line_overrides_it(suffix, signal_cache, tmp_path):
    values = {"cache": str(signal_cache), "fusion": "late", "epochs": 2, "hidden": 24, "features": []}
    path = tmp_path / f"options{suffix}"
    if suffix == ".toml":
        path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
    elif suffix == ".yaml":
        path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")
    else:
        path.write_text(json.dumps(values))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-head", "--config", str(path), "--hidden", "16", "--out", str(run)])
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["fusion"], recorded["epochs"], recorded["hidden"]) == ("late", 2, 16)
    # A run's own config.json is a valid --config: the same options again, into a new directory.
    again = runner.invoke(app, ["train-head", "--config", str(run / "config.json"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["hidden"] == 16
    path.write_text(json.dumps({**values, "hiddn": 3}))
    typo = runner.invoke(app, ["train-head", "--config", str(path.with_suffix(".json"))]) if suffix == ".json" else None
    if typo is not None:
        assert typo.exit_code == 2 and "unknown option 'hiddn'" in typo.output


def test_predict_probs(signal_cache, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, ["train-head", "--cache", str(signal_cache), "--out", str(run), "--epochs", "2"]
                         ).exit_code == 0
    out = tmp_path / "probs.txt"
    result = runner.invoke(app, ["predict", "--run", str(run), "--split", "val", "--probs", "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "guid,tag,p_negative,p_neutral,p_positive"
    saved = pd.read_parquet(run / "val_predictions.parquet")
    first = lines[1].split(",")
    assert first[0] == saved.guid[0] and first[1] == saved.prediction[0]
    assert [float(v) for v in first[2:]] == pytest.approx([saved[f"p_{c}"][0] for c in
                                                          ("negative", "neutral", "positive")], abs=1e-6)
    assert all(abs(sum(float(v) for v in line.split(",")[2:]) - 1) < 1e-4 for line in lines[1:])


def test_the_documented_command_reference_is_the_cli_s_own():
    """docs/cli.md's reference is `msa reference`'s output: regenerate it when the CLI changes."""
    from pathlib import Path

    from msa.cli_reference import BEGIN, END, markdown

    page = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert BEGIN in page and END in page, "docs/cli.md lacks the command reference markers"
    section = page[page.index(BEGIN): page.index(END) + len(END)] + "\n"
    assert section == markdown(app), "docs/cli.md's command reference is stale: run `msa reference` and paste it in"
