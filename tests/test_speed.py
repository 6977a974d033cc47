"""Speed chosen by measurement (issue 16): --precision auto times the variants on this machine,
records its choice, and reuses a stored decision instead of measuring again."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from msa.cache.features import FeatureSet
from msa.cache.manifest import read_manifest
from msa.core import rundir
from msa.core.compute import (
    CPU_BF16_ENV,
    encoding_streams,
    in_cpu_streams,
    loading_workers,
    prefetch,
    resolve_compute,
)
from msa.core.config import CaptionConfig, FinetuneConfig, PredictConfig, TrainHeadConfig
from msa.models.image import ImagePreprocess, build_image_encoder, decode_rgb
from msa.models.text import TextEncoder
from msa.stages import caption, extract, finetune, predict, train_head
from msa.training import autotune
from msa.training.autotune import Measurement, Variant


def test_the_fastest_variant_close_to_fp32_is_chosen_counting_compile_time():
    measured = {"fp32": Measurement(100.0, 0.0, 1.0), "bf16": Measurement(400.0, 0.0, 0.99),  # too far from fp32
                "fp32+compile": Measurement(300.0, 50.0, 0.99999)}
    assert autotune.choose(measured, items=1_000) == Variant("fp32")  # 10 s eager against 53 s compiled
    assert autotune.choose(measured, items=100_000) == Variant("fp32", compile=True)  # 1,000 s against 383 s
    measured["bf16"] = Measurement(400.0, 0.0, 0.9995)
    assert autotune.choose(measured, items=1_000) == Variant("bf16")


def test_auto_precision_is_measured_recorded_in_the_fingerprint_and_reused(extract_config, monkeypatch, tmp_path,
                                                                          private_autotune_file):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)  # measure, as a user's machine does
    measured_variants = []
    real_measure = autotune.measure

    def measure(forward, batch, variants, repeats=2):
        measured_variants.append([v.name for v in variants])
        found = real_measure(forward, batch, variants, repeats)
        # bf16 made the faster one, whatever this CPU is: the choice must follow the measurement.
        return {**found, "bf16": Measurement(found["fp32"].items_per_second * 2, 0.0, found["bf16"].cosine)}

    monkeypatch.setattr(autotune, "measure", measure)
    first = extract.run(extract_config(precision="auto", modalities=("text", "image")), show_progress=False)
    assert measured_variants == [["fp32", "bf16"], ["fp32", "bf16"]]  # once per model; compile: under 1,000 images
    for modality in ("text", "image"):
        feature_set = FeatureSet.open(first.feature_sets[modality].path)
        record = feature_set.notes["autotune"]
        assert record["chosen_by"] == "measured" and record["variant"] == "bf16"
        assert feature_set.fingerprint["precision"] == "bf16"
        assert record["measurements"]["bf16"]["cosine"] >= autotune.MIN_COSINE
    stored = json.loads(private_autotune_file.read_text())
    assert len(stored) == 2 and all(set(entry) == {"fp32", "bf16"} for entry in stored.values())

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a stored decision was measured again")

    monkeypatch.setattr(autotune, "measure", must_not_measure)
    second = extract.run(extract_config(cache=tmp_path / "other-cache", precision="auto", modalities=("text",)),
                         show_progress=False)
    feature_set = FeatureSet.open(second.feature_sets["text"].path)
    assert feature_set.notes["autotune"]["chosen_by"] == "cached" and feature_set.fingerprint["precision"] == "bf16"
    assert second.feature_sets["text"].name == first.feature_sets["text"].name  # the same identity


def test_a_set_complete_in_a_precision_auto_may_choose_is_used_without_loading_or_measuring(
        extract_config, monkeypatch, private_autotune_file):
    """A cache made elsewhere, in the precision this CPU would not guess, on a machine with no stored decision."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    other = "fp32" if resolve_compute("cpu", "auto").precision == "bf16" else "bf16"
    made = extract.run(extract_config(precision=other, modalities=("text", "image")), show_progress=False)
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(extract, "load_encoder", lambda *a, **k: pytest.fail("loaded an encoder"))
    again = extract.run(extract_config(precision="auto", modalities=("text", "image")), show_progress=False)
    for modality in ("text", "image"):
        assert again.feature_sets[modality].status == "cached"
        assert again.feature_sets[modality].name == made.feature_sets[modality].name
    assert not private_autotune_file.exists()


def test_a_variant_far_from_fp32_is_not_chosen_however_fast(extract_config, monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(autotune, "measure", lambda forward, batch, variants, repeats=2: {
        "fp32": Measurement(10.0, 0.0, 1.0), "bf16": Measurement(1000.0, 0.0, 0.98)})
    result = extract.run(extract_config(precision="auto", modalities=("text",)), show_progress=False)
    feature_set = FeatureSet.open(result.feature_sets["text"].path)
    assert feature_set.fingerprint["precision"] == "fp32" and feature_set.notes["autotune"]["variant"] == "fp32"


def test_a_damaged_decisions_file_is_measured_again(monkeypatch, private_autotune_file):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    private_autotune_file.write_text('{"cpu|x": {"fp32": {"items_per_second": "fast"}}, "broken": ')
    calls = []

    def measure_now(variants):
        calls.append(variants)
        return {"fp32": Measurement(10.0, 0.0, 1.0), "bf16": Measurement(20.0, 0.0, 0.9999)}

    decision = autotune.decide("test", "model", 100, False, measure_now)
    assert calls and decision.chosen_by == "measured" and decision.variant == Variant("bf16")
    again = autotune.decide("test", "model", 100, False, measure_now)
    assert len(calls) == 1 and again.chosen_by == "cached" and again.variant == Variant("bf16")


@pytest.mark.parametrize("native_bf16", ["0", "1"])
def test_the_cpu_class_override_decides_without_measuring(native_bf16, monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, native_bf16)
    decision = autotune.decide("test", "model", 100, False,
                               lambda variants: pytest.fail("measured"))
    assert decision.variant.precision == ("bf16" if native_bf16 == "1" else "fp32")


@pytest.mark.parametrize("size, mode", [((640, 480), "RGB"), ((300, 900), "RGB"), ((120, 90), "RGB"),
                                        ((500, 400), "L")])
def test_image_loading_matches_pils_resize_and_crop(size, mode, tmp_path):
    """The decode path resizes with torch's antialiased uint8 kernel: PIL's result within 2 levels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR).convert(mode)  # smooth, like photos
    path = tmp_path / "image.jpg"
    image.save(path, quality=95)
    preprocess = ImagePreprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    with Image.open(path) as img:
        img.draft("RGB", (256, 256))
        img = img.convert("RGB")
        scale = 256 / min(img.size)
        resized_size = (max(224, round(img.size[0] * scale)), max(224, round(img.size[1] * scale)))
        img = img.resize(resized_size, Image.Resampling.BICUBIC)
        left, top = (resized_size[0] - 224) // 2, (resized_size[1] - 224) // 2
        expected = np.asarray(img.crop((left, top, left + 224, top + 224))).transpose(2, 0, 1)
    batch = preprocess.load_batch([str(path), None])  # None: a missing image, blank in the mean colour
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)  # the layout the encoders run in
    assert np.abs(batch[0].numpy().astype(int) - expected.astype(int)).max() <= 2
    assert (batch[1] == 128).all()
    normalised = preprocess.normalise(batch)
    assert normalised.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalised, (batch.float() / 255 - 0.5) / 0.5)


@pytest.fixture
def measured(monkeypatch) -> list[list[str]]:
    """Measuring on (no CPU-class override); each autotune.measure call appends the variants it timed."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    calls = []
    real_measure = autotune.measure

    def measure(forward, batch, variants, *args, **kwargs):
        calls.append([v.name for v in variants])
        return real_measure(forward, batch, variants, *args, **kwargs)

    monkeypatch.setattr(autotune, "measure", measure)
    return calls


def test_caption_precision_is_measured_once_and_recorded(messy_data_source, tiny_models, measured, tmp_path):
    cfg = CaptionConfig(data=messy_data_source, cache=tmp_path / "cache", model=tiny_models["captioner"],
                        batch_size=4, device="cpu", precision="auto")
    first = caption.run(cfg, show_progress=False).caption_set.notes
    assert measured == [["fp32", "bf16"]]
    assert first["autotune"]["chosen_by"] == "measured" and first["precision"] == first["autotune"]["variant"]
    assert set(first["autotune"]["measurements"]) == {"fp32", "bf16"}
    again = caption.run(dataclasses.replace(cfg, cache=tmp_path / "other"), show_progress=False).caption_set.notes
    assert measured == [["fp32", "bf16"]] and again["autotune"]["chosen_by"] == "cached"
    assert again["precision"] == first["precision"]


def test_train_head_precision_is_measured_once_and_the_run_is_the_same_either_way(signal_cache, measured, tmp_path):
    runs = [train_head.run(TrainHeadConfig(cache=signal_cache, fusion="co-attn", epochs=2, hidden=32, seed=3,
                                           out=tmp_path / name), log=lambda *_: None) for name in ("first", "second")]
    assert len(measured) == 1  # the second run decided from the stored timings
    first, second = (rundir.read_json(run.run_dir / rundir.AUTOTUNE) for run in runs)
    assert (first["chosen_by"], second["chosen_by"]) == ("measured", "cached")
    assert runs[0].metrics["precision"] == runs[1].metrics["precision"] == first["variant"]
    # Measuring trained a copy of the model with the random state restored: the runs are equal.
    weights = [rundir.load_model(run.run_dir)[0] for run in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert runs[0].metrics["macro_f1"] == runs[1].metrics["macro_f1"]


def test_finetune_precision_is_measured_recorded_and_reused(messy_data_source, tiny_models, measured, tmp_path):
    cfg = FinetuneConfig(data=messy_data_source, out=tmp_path / "first", text_model=tiny_models["text"], max_len=16,
                         image_model="timm:test_efficientnet", image_weights=tiny_models["image_weights"], hidden=16,
                         unfreeze_text_layers=1, epochs=1, batch_size=8, device="cpu", precision="auto")
    records = []
    for out in ("first", "second"):
        run_dir = finetune.run(dataclasses.replace(cfg, out=tmp_path / out), show_progress=False, log=lambda *_: None)
        records.append(rundir.read_json(run_dir / rundir.AUTOTUNE))
    assert len(measured) == 1 and [r["chosen_by"] for r in records] == ["measured", "cached"]
    assert records[0]["variant"] == records[1]["variant"] and set(records[0]["measurements"]) == {"fp32", "bf16"}
    # predict runs in the precision the run validated in: its val predictions come back.
    _, predictions = predict.run(PredictConfig(run=run_dir, split="val"), show_progress=False)
    saved = pd.read_parquet(run_dir / rundir.VAL_PREDICTIONS)
    np.testing.assert_allclose(predictions.probabilities, saved[[f"p_{c}" for c in predictions.class_names]],
                               atol=1e-6)


def test_an_unwritable_decisions_file_measures_and_goes_on(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(autotune.DECISIONS_ENV, str(blocker / "autotune.json"))
    calls = []

    def measure_now(variants):
        calls.append(variants)
        return {"fp32": Measurement(10.0, 0.0, 1.0), "bf16": Measurement(20.0, 0.0, 0.9999)}

    decisions = [autotune.decide("test", "model", 100, False, measure_now) for _ in range(2)]
    assert [d.chosen_by for d in decisions] == ["measured", "measured"] and len(calls) == 2
    assert all(d.variant == Variant("bf16") for d in decisions)
    assert "could not store the measured precision" in capsys.readouterr().err


def test_cpu_streams_keep_order_take_their_share_of_threads_and_stop_on_a_failure():
    threads = torch.get_num_threads()
    started, seen_threads = [], []

    def work(item):
        started.append(item)
        seen_threads.append(torch.get_num_threads())
        time.sleep(0.02 if item % 2 else 0.0)  # odd items finish last: the order must still hold
        if item == 5:
            raise ValueError("item 5 is bad")
        return item * 10

    try:
        torch.set_num_threads(16)
        assert encoding_streams(resolve_compute("cpu", "fp32")) == 8  # more threads each, not more batches at once
        torch.set_num_threads(4)
        out = []
        with pytest.raises(ValueError, match="item 5 is bad"):
            for result in in_cpu_streams(work, list(range(40)), streams=2):
                out.append(result)
        assert out == [0, 10, 20, 30, 40]
        assert set(seen_threads) == {2}  # 4 threads shared by 2 streams
        cpu = resolve_compute("cpu", "fp32")
        assert encoding_streams(cpu) == 4 and encoding_streams(cpu, compiled=True) == 1
        assert encoding_streams(dataclasses.replace(cpu, device=torch.device("cuda"))) == 1
        assert torch.get_num_threads() == 4  # restored for the rest of the process
        time.sleep(0.1)
        assert max(started) <= 8  # nothing queued after the failure (4 ahead of item 4) was started
    finally:
        torch.set_num_threads(threads)


def test_texts_and_images_encoded_in_cpu_streams_equal_the_encoders_on_everything_at_once(extract_config,
                                                                                          tiny_models):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert encoding_streams(resolve_compute("cpu", "fp32"), compiled=False) == 2
        cfg = extract_config(modalities=("text", "image"), batch_size=4)
        result = extract.run(cfg, show_progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    manifest = read_manifest(cfg.cache)
    every_row = np.arange(len(manifest))
    image_encoder = build_image_encoder(cfg.image_model, tiny_models["image_weights"]).eval()
    pixels = image_encoder.preprocess.load_batch(manifest.image_sources()).contiguous()  # plain layout: equal too
    text_encoder = TextEncoder(tiny_models["text"], max_len=16, pooling="mean")
    with torch.inference_mode():
        tokens, pooled = image_encoder(image_encoder.preprocess.normalise(pixels))
        _, text_pooled = text_encoder(*text_encoder.collate(text_encoder.tokenize(manifest.column("text"))))
    images = FeatureSet.open(result.feature_sets["image"].path)
    np.testing.assert_allclose(images.load("pooled", every_row), pooled.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(images.load("tokens", every_row), tokens.numpy(), atol=2e-3, rtol=2e-3)
    texts = FeatureSet.open(result.feature_sets["text"].path)
    np.testing.assert_allclose(texts.load("pooled", every_row), text_pooled.numpy(), atol=2e-3, rtol=2e-3)


def test_loading_ahead_keeps_order_runs_its_workers_at_once_and_takes_a_gpu_machine_s_cores(monkeypatch):
    four_at_once = threading.Barrier(4, timeout=30)  # broken unless the first four load together

    def load(item):
        if item < 4:
            four_at_once.wait()
        time.sleep(0.02 if item % 3 == 0 else 0.0)  # some finish late: the order must still hold
        return item * 10

    assert list(prefetch(list(range(20)), load, workers=4)) == [i * 10 for i in range(20)]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert loading_workers(torch.device("cpu")) == 1  # the CPU's cores run the forward pass
    assert loading_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert loading_workers(torch.device("cuda")) == 3


def test_images_loaded_by_several_workers_for_one_stream_give_the_streams_features(extract_config, monkeypatch,
                                                                                   tmp_path):
    """A GPU's path (one encoding stream, images loaded ahead by a thread per core), run on the CPU."""
    cfg = extract_config(modalities=("image",), batch_size=4)
    streamed = extract.run(dataclasses.replace(cfg, cache=tmp_path / "streams"), show_progress=False)
    from msa.models.modalities import image

    monkeypatch.setattr(image, "encoding_streams", lambda compute, compiled=False: 1)
    monkeypatch.setattr(image, "loading_workers", lambda device: 3)
    loaded_ahead = extract.run(dataclasses.replace(cfg, cache=tmp_path / "one-stream"), show_progress=False)
    want = FeatureSet.open(streamed.feature_sets["image"].path)
    got = FeatureSet.open(loaded_ahead.feature_sets["image"].path)
    for part in ("pooled", "tokens"):
        np.testing.assert_allclose(got.load(part), want.load(part), atol=2e-3, rtol=2e-3, err_msg=part)


@pytest.mark.parametrize("size, mode, subsampling", [((2100, 1100), "RGB", 2), ((1100, 530), "RGB", 0),
                                                     ((600, 800), "L", 0), ((300, 200), "RGB", 1),
                                                     ((700, 700), "CMYK", 0)])
def test_jpeg_decoding_gives_pils_draft_mode_pixels(size, mode, subsampling, tmp_path):
    """simplejpeg decodes at PIL's draft scale (1/8 to 1; a CMYK JPEG goes through PIL itself)
    to the very same pixels, so image sets extracted before it stay valid."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (size[1] // 20 + 1, size[0] // 20 + 1, 3), dtype=np.uint8)
    path = tmp_path / "image.jpg"
    Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR).convert(mode).save(
        path, quality=90, subsampling=subsampling)
    with Image.open(path) as img:
        img.draft("RGB", (256, 256))
        expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    decoded = decode_rgb(str(path), 256).numpy()
    assert decoded.shape == expected.shape and min(decoded.shape[1:]) >= min(256, *size)
    np.testing.assert_array_equal(decoded, expected)


def test_decisions_are_kept_apart_for_kernels_held_below_the_cpu(monkeypatch):
    """A decision measured with oneDNN held to AVX2 (as an AVX2-only CPU runs) is not reused unheld."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    unheld = autotune.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    held = autotune.machine_key()
    assert held != unheld and "/AVX2|" in held and torch.backends.cpu.get_cpu_capability() in held
