"""Captioning (`msa caption`) and caption text sources: a tiny random BLIP on generated images."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from msa.cache.captions import BAD_IMAGE, CaptionSet, caption_dir
from msa.cache.features import CacheError, FeatureSet
from msa.cli import app
from msa.core.config import CaptionConfig, PredictConfig, TrainHeadConfig
from msa.data.demo import make_demo_dataset
from msa.models.text import EncoderLoadError
from msa.stages import caption, extract, predict, train_head

BAD_IMAGE_GUIDS = {"9005", "9006", "9007"}  # missing, truncated, not an image


@pytest.fixture
def caption_config(messy_data_source, tiny_models, tmp_path):
    def make(**overrides) -> CaptionConfig:
        cfg = CaptionConfig(data=messy_data_source, cache=tmp_path / "cache", model=tiny_models["captioner"],
                            batch_size=4, device="cpu")
        return dataclasses.replace(cfg, **overrides)

    return make


def test_every_image_gets_one_caption_and_bad_images_a_flag(caption_config):
    result = caption.run(caption_config(prompt="a photo with"), show_progress=False)
    captions = result.caption_set.captions
    listed = {line.split(",")[0] for name in ("train.txt", "test_without_label.txt")
              for line in (caption_config().data / name).read_text().splitlines()[1:]}
    assert set(captions) == listed and result.items == len(listed)
    for guid in BAD_IMAGE_GUIDS:
        assert captions[guid].text == "" and captions[guid].flag == BAD_IMAGE
    readable = [c for g, c in captions.items() if g not in BAD_IMAGE_GUIDS]
    assert all(c.flag == "" for c in readable)
    assert len({c.text for c in readable}) > 1  # the tiny model's words depend on the image
    assert not any(c.text.startswith("a photo with") for c in readable)  # the prompt is not stored
    assert result.path.name == f"{result.name}.parquet" and not list(caption_dir(result.path.parent.parent).glob(
        "*.partial.jsonl"))


def test_batched_captions_equal_one_image_at_a_time(caption_config, tmp_path):
    batched = caption.run(caption_config(batch_size=8), show_progress=False).caption_set.captions
    single = caption.run(caption_config(batch_size=1, cache=tmp_path / "single"), show_progress=False)
    assert {g: c.text for g, c in single.caption_set.captions.items()} == {g: c.text for g, c in batched.items()}


def test_second_run_loads_no_model(caption_config, monkeypatch):
    first = caption.run(caption_config(), show_progress=False)

    def no_model(*args, **kwargs):
        raise AssertionError("a second run must not build the captioner")

    monkeypatch.setattr(caption, "create_captioner", no_model)
    second = caption.run(caption_config(), show_progress=False)
    assert (second.cached, second.captioned) == (first.items, 0)
    assert second.caption_set.captions == first.caption_set.captions


def test_interrupted_run_resumes_where_it_stopped(caption_config, tmp_path):
    reference = caption.run(caption_config(cache=tmp_path / "whole"), show_progress=False).caption_set.captions
    seen = []

    def stop_after_two_batches(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caption.run(caption_config(), show_progress=False, on_batch=stop_after_two_batches)
    (partial,) = caption_dir(tmp_path / "cache").glob("*.partial.jsonl")
    with open(partial, "a") as f:  # a kill in the middle of a line leaves it torn
        f.write('{"guid": "1", "capt')
    resumed_batches = []
    result = caption.run(caption_config(), show_progress=False, on_batch=resumed_batches.append)
    # 3 bad images were written up front, then 2 batches of 4; the torn line costs nothing.
    assert result.cached == 3 + 8 and sum(resumed_batches) == result.items - 11
    assert result.caption_set.captions == reference
    assert not partial.exists()


def test_a_replaced_image_is_captioned_again(caption_config, messy_data):
    first = caption.run(caption_config(data=messy_data), show_progress=False)
    image = messy_data / "data" / "1.jpg"
    image.write_bytes((messy_data / "data" / "2.jpg").read_bytes() + b"\0" * 10)
    second = caption.run(caption_config(data=messy_data), show_progress=False)
    assert second.captioned == 1 and second.cached == first.items - 1
    assert second.caption_set.captions["1"].image_bytes == image.stat().st_size


@pytest.mark.parametrize("change", [{"num_beams": 2}, {"max_new_tokens": 5}, {"prompt": "a photo"}])
def test_changed_generation_setting_gives_a_new_caption_set(caption_config, change):
    base = caption.run(caption_config(limit=4), show_progress=False)
    changed = caption.run(caption_config(limit=4, **change), show_progress=False)
    assert changed.name != base.name and changed.captioned == 4
    assert len(list(caption_dir(caption_config().cache).glob("*.parquet"))) == 2


def test_caption_text_sources_are_separate_feature_sets(caption_config, extract_config):
    with pytest.raises(CacheError, match="msa caption"):
        extract.run(extract_config(text_source="raw+caption", modalities=("text",)), show_progress=False)
    captions = caption.run(caption_config(), show_progress=False).caption_set
    sets = {}
    for source in ("raw", "caption", "raw+caption"):
        result = extract.run(extract_config(text_source=source, modalities=("text",)), show_progress=False)
        sets[source] = FeatureSet.open(result.feature_sets["text"].path)
    assert len({fs.name for fs in sets.values()}) == 3
    assert sets["raw+caption"].name.startswith("text-raw-caption-")
    assert "captions" not in sets["raw"].fingerprint
    assert sets["raw+caption"].fingerprint["captions"] == captions.fingerprint
    assert sets["raw+caption"].notes["extract_config"]["captions"] == captions.name
    raw, both, only = (fs.load("pooled") for fs in sets.values())
    assert not np.allclose(raw, both) and not np.allclose(only, both)
    # A post's own features do not depend on captions; with them, longer sequences are stored.
    assert sets["raw+caption"].load("mask").sum() > sets["raw"].load("mask").sum()


def test_two_caption_sets_need_a_choice(caption_config, extract_config):
    caption.run(caption_config(), show_progress=False)
    second = caption.run(caption_config(max_new_tokens=4), show_progress=False)
    with pytest.raises(CacheError, match="choose with --captions"):
        extract.run(extract_config(text_source="caption", modalities=("text",)), show_progress=False)
    chosen = extract.run(extract_config(text_source="caption", modalities=("text",), captions=second.name),
                         show_progress=False)
    fingerprint = FeatureSet.open(chosen.feature_sets["text"].path).fingerprint
    assert fingerprint["captions"]["max_new_tokens"] == 4


def test_predict_captions_new_data_for_a_caption_run(caption_config, extract_config, tmp_path):
    caption.run(caption_config(), show_progress=False)
    extract.run(extract_config(text_source="raw+caption"), show_progress=False)
    run = train_head.run(TrainHeadConfig(cache=extract_config().cache, fusion="concat", out=tmp_path / "run",
                                         epochs=2, hidden=16), log=lambda *_: None)
    new_data = make_demo_dataset(tmp_path / "new", n_labelled=4, n_test=5, seed=3)
    path, predictions = predict.run(PredictConfig(run=run.run_dir, data=new_data, device="cpu"),
                                    show_progress=False)
    assert len(predictions.guids) == 5 and len(path.read_text().splitlines()) == 6
    (new_captions,) = caption_dir(run.run_dir / "predict-cache").glob("*.parquet")
    run_config = json.loads((run.run_dir / "config.json").read_text())
    text_info = run_config["feature_sets"]["text"]
    assert new_captions.stem == text_info["extract_config"]["captions"]  # the same captioner and settings
    assert len(CaptionSet.load(run.run_dir / "predict-cache", new_captions.stem).captions) == 9


def test_caption_cli_prints_a_summary(caption_config):
    cfg = caption_config(limit=6)
    result = CliRunner().invoke(app, ["caption", "--data", str(cfg.data), "--cache", str(cfg.cache), "--model",
                                      cfg.model, "--limit", "6", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "6 (0 captioned before, 6 now" in result.output and "captions: " in result.output
    missing = CliRunner().invoke(app, ["caption", "--data", str(cfg.data), "--cache", str(cfg.cache),
                                       "--model", str(cfg.cache / "no-such-model"), "--no-progress"])
    assert missing.exit_code == 2 and "could not load captioning model" in missing.output


FAKE_LAVIS = textwrap.dedent('''
    """Stands in for salesforce-lavis 1.0.2 with its documented interface:
    load_model_and_preprocess(name, model_type, is_eval, device) -> (model, vis_processors, txt_processors);
    vis_processors["eval"](PIL image) -> [3, H, W] tensor; model.generate(samples, use_nucleus_sampling,
    num_beams, max_length, min_length) -> list of captions with the prompt cut off; model.prompt,
    model.prompt_length, model.tokenizer."""
    import json, os
    import torch

    class Tokenizer:
        def __call__(self, text):
            return type("Encoded", (), {"input_ids": [101] + [1] * len(text.split()) + [102]})()

    class BlipCaption:
        def __init__(self):
            self.prompt, self.tokenizer = "a picture of ", Tokenizer()
            self.prompt_length = len(self.tokenizer(self.prompt).input_ids) - 1

        def generate(self, samples, use_nucleus_sampling=False, num_beams=3, max_length=30, min_length=10):
            with open(os.environ["FAKE_LAVIS_LOG"], "a") as log:
                log.write(json.dumps({"prompt": self.prompt, "num_beams": num_beams, "max_length": max_length,
                                      "min_length": min_length, "n": len(samples["image"])}) + "\\n")
            return [f"  shade {int(image.mean() * 100)} " for image in samples["image"]]

    def load_model_and_preprocess(name, model_type, is_eval=False, device="cpu"):
        if (name, model_type) not in {("blip_caption", "base_coco"), ("blip_caption", "large_coco")}:
            raise ValueError(f"unknown model {name}/{model_type}")
        to_tensor = lambda image: torch.tensor(list(image.resize((8, 8)).getdata()), dtype=torch.float32) / 255
        return BlipCaption(), {"eval": to_tensor}, {"eval": str}
''')


def test_lavis_adapter_against_lavis_documented_interface(caption_config, tmp_path, monkeypatch):
    """lavis cannot install beside transformers 5 (see README), so a stand-in with lavis's documented
    interface takes its place; the adapter runs its worker in a real subprocess all the same."""
    package = tmp_path / "fake" / "lavis"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text(FAKE_LAVIS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_LAVIS_LOG", str(tmp_path / "log.jsonl"))
    cfg = caption_config(backend="lavis", model="base_coco", lavis_python=sys.executable, prompt="a photo of",
                         max_new_tokens=12)
    result = caption.run(cfg, show_progress=False)
    captions = result.caption_set.captions
    assert all(captions[g].text.startswith("shade ") for g in captions if g not in BAD_IMAGE_GUIDS)
    assert all(captions[g].flag == BAD_IMAGE for g in BAD_IMAGE_GUIDS)
    calls = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    prompt_length = 4  # lavis's own count for "a photo of": [CLS] + 3 words + [SEP], less one
    assert calls[0] == {"prompt": "a photo of", "num_beams": 1, "max_length": prompt_length + 12,
                        "min_length": prompt_length + 1, "n": 4}
    assert sum(c["n"] for c in calls) == result.items - len(BAD_IMAGE_GUIDS)
    assert result.caption_set.fingerprint["backend"] == "lavis"
    with pytest.raises(EncoderLoadError, match="could not load blip_caption/tiny_coco"):
        caption.run(dataclasses.replace(cfg, model="tiny_coco", cache=tmp_path / "other"), show_progress=False)


def test_lavis_missing_says_how_to_install(caption_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "empty"))  # no lavis on the path
    with pytest.raises(EncoderLoadError, match="lavis needs its own Python environment.*--lavis-python"):
        caption.run(caption_config(backend="lavis", model="base_coco", lavis_python=sys.executable),
                    show_progress=False)
    with pytest.raises(ValueError, match="--backend must be one of transformers, lavis, got 'clip'"):
        caption.run(caption_config(backend="clip"), show_progress=False)
