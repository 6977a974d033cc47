"""`msa extract`: shapes, alignment, caching, fingerprints, resuming, sharding."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from msa.cache.features import FeatureSet, partial_path
from msa.cache.maintenance import merge_shards
from msa.cache.manifest import read_manifest
from msa.cache.writer import FeatureWriter
from msa.models.text import TextEncoder
from msa.stages import extract


def load_all(path) -> dict[str, np.ndarray]:
    feature_set = FeatureSet.open(path)
    return {part: feature_set.load(part) for part in ("pooled", "tokens", "mask")}


def test_extract_shapes_dtypes_and_alignment(extract_config):
    cfg = extract_config()
    result = extract.run(cfg, show_progress=False)
    manifest = read_manifest(cfg.cache)
    n = len(manifest)
    text = FeatureSet.open(result.feature_sets["text"].path)
    image = FeatureSet.open(result.feature_sets["image"].path)
    assert text.guids == image.guids == manifest.guids
    assert text.shapes == {"pooled": (n, 32), "tokens": (n, 16, 32), "mask": (n, 16)}
    # test_efficientnet at its 160 px input: a 5x5 map of 256 channels -> 25 tokens.
    assert image.shapes == {"pooled": (n, 256), "tokens": (n, 25, 256), "mask": (n, 25)}
    assert text.load("tokens").dtype == np.float16 and text.load("mask").dtype == bool
    mask = text.load("mask")
    assert mask[:, 0].all() and not mask.all()  # every text has [CLS]; short ones are padded
    padded = text.load("tokens")[~mask]
    assert not padded.any()  # padding positions hold zeros
    assert text.fingerprint["max_len"] == 16 and text.fingerprint["manifest_id"] == manifest.manifest_id
    assert image.fingerprint["preprocess"]["crop"] == 160


def test_second_extract_does_no_encoder_work(extract_config, monkeypatch):
    cfg = extract_config()
    first = extract.run(cfg, show_progress=False)

    def no_encoders(*args, **kwargs):
        raise AssertionError("an encoder was built on a fully cached run")

    from msa.models.modalities import image, text

    monkeypatch.setattr(text, "TextEncoder", no_encoders)
    monkeypatch.setattr(image, "build_image_encoder", no_encoders)
    second = extract.run(cfg, show_progress=False)
    assert all(r.cached and r.encoded_rows == 0 for r in second.feature_sets.values())
    assert {m: r.path for m, r in first.feature_sets.items()} == {m: r.path for m, r in second.feature_sets.items()}


@pytest.mark.parametrize("change", [{"max_len": 12}, {"pooling": "cls"}, {"split_seed": 7}])
def test_changed_option_gives_a_new_feature_set(extract_config, change):
    base = extract.run(extract_config(modalities=("text",)), show_progress=False).feature_sets["text"]
    changed = extract.run(extract_config(modalities=("text",), **change), show_progress=False).feature_sets["text"]
    assert changed.name != base.name and not changed.cached
    assert base.path.is_file() and changed.path.is_file()  # the old set is kept, never overwritten


def test_interrupted_extract_resumes_to_identical_features(extract_config, tmp_path):
    reference = extract.run(extract_config(cache=tmp_path / "reference"), show_progress=False)
    cfg = extract_config(cache=tmp_path / "resumed")
    batches_seen = []

    def crash_after_two_batches(modality, n_rows):
        batches_seen.append(modality)
        if modality == "image" and batches_seen.count("image") == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg, show_progress=False, on_batch=crash_after_two_batches)
    image_name = reference.feature_sets["image"].name
    partial = partial_path(cfg.cache / "features" / f"{image_name}.h5")
    assert partial.is_file() and not partial.with_suffix("").is_file()  # not published as complete
    with h5py.File(partial, "r") as f:
        assert f["done"][:].sum() == 2 * cfg.batch_size

    resumed = extract.run(cfg, show_progress=False)
    assert resumed.feature_sets["text"].cached  # finished before the crash
    assert resumed.feature_sets["image"].resumed_rows == 2 * cfg.batch_size
    assert resumed.feature_sets["image"].encoded_rows == len(read_manifest(cfg.cache)) - 2 * cfg.batch_size
    for modality in ("text", "image"):
        want, got = load_all(reference.feature_sets[modality].path), load_all(resumed.feature_sets[modality].path)
        for part in want:
            np.testing.assert_array_equal(got[part], want[part], err_msg=f"{modality} {part}")


@pytest.mark.parametrize("modality", ["text", "image", "lexicon"])
def test_a_run_stopped_after_its_last_write_publishes_on_resume_without_encoding(extract_config, tmp_path, modality):
    # A rank of torchrun stopped between its last write and publishing: the next run finds no row
    # pending (the tokenizer failed on no texts, CI run 20).
    reference = extract.run(extract_config(cache=tmp_path / "reference", modalities=(modality,)), show_progress=False)
    cfg = extract_config(cache=tmp_path / "resumed", modalities=(modality,))
    n = len(reference.manifest)
    written = []

    def stop_after_the_last_write(seen_modality, n_rows):
        written.append(n_rows)
        if sum(written) == n:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg, show_progress=False, on_batch=stop_after_the_last_write)
    resumed = extract.run(cfg, show_progress=False).feature_sets[modality]
    assert (resumed.status, resumed.resumed_rows, resumed.encoded_rows) == ("resumed", n, 0)
    want, got = FeatureSet.open(reference.feature_sets[modality].path), FeatureSet.open(resumed.path)
    for part in want.shapes:
        np.testing.assert_array_equal(got.load(part), want.load(part), err_msg=part)


def test_shards_merge_into_the_unsharded_set(extract_config, tmp_path):
    whole = extract.run(extract_config(cache=tmp_path / "whole", modalities=("text",)), show_progress=False)
    cache = tmp_path / "sharded"
    for i in range(3):
        shard = extract.run(extract_config(cache=cache, modalities=("text",), shard=f"{i}/3"), show_progress=False)
    name = shard.feature_sets["text"].name
    assert name == whole.feature_sets["text"].name
    merged = merge_shards(cache, name)
    assert not list((cache / "features").glob("*shard*"))
    want, got = load_all(whole.feature_sets["text"].path), load_all(merged)
    for part in want:
        np.testing.assert_array_equal(got[part], want[part])
    # A later unsharded run finds the merged set complete.
    again = extract.run(extract_config(cache=cache, modalities=("text",)), show_progress=False)
    assert again.feature_sets["text"].cached


def test_bad_images_are_blank_and_rows_stay_aligned(extract_config):
    cfg = extract_config(modalities=("image",))
    result = extract.run(cfg, show_progress=False)
    manifest = read_manifest(cfg.cache)
    pooled = FeatureSet.open(result.feature_sets["image"].path).load("pooled")
    bad_rows = [manifest.guids.index(g) for g in ("9005", "9006", "9007")]
    np.testing.assert_array_equal(pooled[bad_rows[0]], pooled[bad_rows[1]])
    np.testing.assert_array_equal(pooled[bad_rows[0]], pooled[bad_rows[2]])
    assert not np.array_equal(pooled[bad_rows[0]], pooled[0])


def test_skip_policy_leaves_bad_images_out_of_the_cache(extract_config):
    cfg = extract_config(on_bad_image="skip", modalities=("text",))
    result = extract.run(cfg, show_progress=False)
    assert not {"9005", "9006", "9007"} & set(read_manifest(cfg.cache).guids)
    assert len(result.report.skipped) == 3


def test_cached_text_features_match_the_encoder(extract_config, tiny_models):
    cfg = extract_config(modalities=("text",), precision="fp32")
    result = extract.run(cfg, show_progress=False)
    manifest = read_manifest(cfg.cache)
    encoder = TextEncoder(tiny_models["text"], max_len=16, pooling="mean")
    rows = [0, 5, manifest.guids.index("9003")]  # includes the empty text
    input_ids, attention_mask = encoder.collate(encoder.tokenize([manifest.column("text")[r] for r in rows]))
    with torch.inference_mode():
        tokens, pooled = encoder(input_ids, attention_mask)
    cached = FeatureSet.open(result.feature_sets["text"].path)
    np.testing.assert_allclose(cached.load("pooled", np.array(rows)), pooled.numpy(), atol=2e-3, rtol=2e-3)
    length = tokens.shape[1]
    expected_tokens = tokens.numpy() * attention_mask.numpy()[..., None]
    np.testing.assert_allclose(cached.load("tokens", np.array(rows))[:, :length], expected_tokens, atol=2e-3, rtol=2e-3)


def test_limit_takes_the_first_items(extract_config):
    cfg = extract_config(limit=5, modalities=("text",))
    result = extract.run(cfg, show_progress=False)
    assert len(read_manifest(cfg.cache)) == 5
    assert FeatureSet.open(result.feature_sets["text"].path).shapes["pooled"][0] == 5
    # The summary describes the 5 items used, not the whole folder.
    assert result.report.items_read == 5 and sum(result.report.class_counts.values()) == 5
    guids = set(read_manifest(cfg.cache).guids)
    assert all(bad["guid"] in guids for bad in result.report.bad_items)
    (table, features) = extract.summary_tables(result)
    assert features.caption == "encoded: encoded by this run"  # the legend names what happened in this run


def test_bad_shard_spec_is_a_clear_error(extract_config):
    with pytest.raises(ValueError, match="--shard must look like i/n"):
        extract.run(extract_config(shard="2-of-3"), show_progress=False)
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        extract.run(extract_config(shard="3/3"), show_progress=False)


def test_batches_in_any_row_order_are_stored_under_their_rows(tmp_path):
    guids = [str(i) for i in range(8)]
    rng = np.random.default_rng(0)
    pooled, tokens = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 3, 4)).astype(np.float32)
    path = tmp_path / "set.h5"
    with FeatureWriter(path, {"model": "test"}, guids, np.arange(8), {}) as writer:
        for batch in ([5, 1, 3], [0, 2, 4], [6, 7]):  # unsorted, sorted with gaps, a contiguous run
            rows = np.array(batch)
            writer.write(rows, pooled[rows], tokens[rows], np.ones((len(rows), 3), dtype=bool))
        writer.finish()
    stored = FeatureSet.open(path)
    every_row = np.arange(8)
    np.testing.assert_array_equal(stored.load("pooled", every_row), pooled.astype(np.float16))
    np.testing.assert_array_equal(stored.load("tokens", every_row), tokens.astype(np.float16))


def test_device_decode_batches_jpegs_and_leaves_the_rest_to_the_cpu_path(tmp_path, monkeypatch):
    """load_batch_on, run here on the CPU as on a GPU: plain JPEGs decoded as one batch, a PNG,
    an EXIF-turned JPEG and a missing image through `load`, exactly; a file the batch decoder
    refuses falls back alone, the others still batched."""
    import torchvision.io
    from PIL import Image

    from msa.models.image import EXIF_ORIENTATION, image_preprocess

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        pixels = np.clip(rng.normal(120 + 30 * i, 40, (150 + 20 * i, 200, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=90)
        paths.append(str(tmp_path / f"{i}.jpg"))
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(tmp_path / "png.jpg", format="PNG")
    turned = Image.open(paths[0])
    exif = turned.getexif()
    exif[EXIF_ORIENTATION] = 6
    turned.save(tmp_path / "turned.jpg", exif=exif)
    paths += [str(tmp_path / "png.jpg"), str(tmp_path / "turned.jpg"), None]
    preprocess = image_preprocess("resnet18")
    batch, on_cpu = preprocess.load_batch_on(paths, torch.device("cpu"))
    assert batch.shape == (6, 3, preprocess.crop, preprocess.crop) and on_cpu == 3
    for i in (3, 4, 5):
        assert torch.equal(batch[i], preprocess.load(paths[i]))
    for i in range(3):  # whole decode then resize, against draft decode: the same picture
        assert (batch[i].float() - preprocess.load(paths[i]).float()).abs().mean() < 3
    batched = torchvision.io.decode_jpeg

    def refusing(encoded, **kwargs):
        if isinstance(encoded, list) or len(encoded) == len(open(paths[1], "rb").read()):
            raise RuntimeError("refused")
        return batched(encoded, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
    again, on_cpu = preprocess.load_batch_on(paths, torch.device("cpu"))
    assert on_cpu == 4 and torch.equal(again[1], preprocess.load(paths[1]))
    assert torch.equal(again[0], batch[0]) and torch.equal(again[2], batch[2])


def test_device_decoded_features_agree_with_cpu_decoded_ones(extract_config):
    """The same images decoded whole on the device and in draft mode on the CPU: another set
    (its fingerprint says how it was decoded), features at a cosine >= 0.999 item by item."""
    sets = {}
    for decode in ("cpu", "device"):
        result = extract.run(extract_config(modalities=("image",), image_decode=decode), show_progress=False)
        sets[decode] = result.feature_sets["image"]
    assert sets["cpu"].name != sets["device"].name
    assert FeatureSet.open(sets["device"].path).fingerprint["decode"] == "device-batch"
    cpu, device = (load_all(sets[d].path)["pooled"].astype(np.float32) for d in ("cpu", "device"))
    cosine = (cpu * device).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(device, axis=1))
    assert cosine.min() >= 0.999, cosine.min()


def test_the_device_text_path_stores_what_the_cpu_path_stores(extract_config, monkeypatch):
    """Tokenised a window ahead, batched by token budget, written a window behind: run here on
    the CPU, the same features as the CPU path's, row for row."""
    from msa.models.modalities import text as text_modality

    plain = extract.run(extract_config(modalities=("text",)), show_progress=False).feature_sets["text"]
    expected = load_all(plain.path)
    monkeypatch.setattr(text_modality, "pipelined", lambda compute: True)
    monkeypatch.setattr(text_modality, "WRITE_WINDOW", 7)  # several windows in flight
    cfg = extract_config(modalities=("text",), cache=extract_config().cache.with_name("device-path"))
    stored = load_all(extract.run(cfg, show_progress=False).feature_sets["text"].path)
    assert np.array_equal(stored["mask"], expected["mask"])
    np.testing.assert_allclose(stored["pooled"], expected["pooled"], atol=1e-5)
    np.testing.assert_allclose(stored["tokens"], expected["tokens"], atol=2e-3)  # float16, other padding


def test_token_budget_batches_fill_the_budget_longest_first():
    from msa.models.modalities.text import token_budget_batches

    ids = [[0] * n for n in (3, 10, 5, 10, 2, 8, 1)]
    batches = token_budget_batches(ids, max_tokens=20, most=3)
    assert [list(b) for b in batches] == [[1, 3], [5, 2], [0, 4, 6]]
    assert sorted(np.concatenate(batches)) == list(range(len(ids)))
    assert [list(b) for b in token_budget_batches([[0] * 30], max_tokens=20, most=3)] == [[0]]  # never empty


def test_a_failed_write_behind_stops_the_writing_and_is_raised_in_the_caller():
    from msa.core.compute import WriteBehind

    written = []

    def write(n: int) -> None:
        if n == 2:
            raise OSError("disk full")
        written.append(n)

    with pytest.raises(OSError, match="disk full"), WriteBehind(write, pending=1) as writer:
        for n in range(6):
            writer.put(n)
    assert written == [0, 1]  # nothing after the failure
