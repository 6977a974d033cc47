"""The manifest: a deterministic stratified split, stored and read back intact."""

from __future__ import annotations

import collections

import numpy as np

from msa.cache.manifest import build_manifest, read_manifest, stratified_split, write_manifest
from msa.data.mvsa import read_mvsa


def test_split_is_deterministic_and_stratified():
    labels = ["positive"] * 500 + ["negative"] * 250 + ["neutral"] * 90
    first = stratified_split(labels, val_ratio=0.2, seed=42)
    assert first == stratified_split(labels, val_ratio=0.2, seed=42)
    assert first != stratified_split(labels, val_ratio=0.2, seed=7)
    val_counts = collections.Counter(lab for lab, s in zip(labels, first) if s == "val")
    assert val_counts == {"positive": 100, "negative": 50, "neutral": 18}


def test_manifest_round_trip(messy_data, tmp_path):
    items, _ = read_mvsa(messy_data)
    manifest = build_manifest(items, messy_data, val_ratio=0.2, split_seed=42, on_bad_image="blank")
    write_manifest(manifest, tmp_path)
    back = read_manifest(tmp_path)
    assert back.table.equals(manifest.table)
    assert back.info == manifest.info
    assert back.guids == [i.guid for i in items]
    assert back.column("flags")[back.guids.index("9006")] == ["corrupt_image"]
    assert set(back.column("split")) == {"train", "val", "test"}
    assert all(lab is None for lab, s in zip(back.column("label"), back.column("split")) if s == "test")
    assert len(back.rows_of_split("test")) == 6
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind


def test_manifest_id_follows_content_not_location(messy_data, tmp_path):
    items, _ = read_mvsa(messy_data)
    a = build_manifest(items, messy_data, 0.2, 42, "blank")
    b = build_manifest(items, tmp_path / "elsewhere", 0.2, 42, "blank")
    c = build_manifest(items, messy_data, 0.2, 43, "blank")
    assert a.manifest_id == b.manifest_id != c.manifest_id
    assert np.array_equal(a.rows_of_split("test"), c.rows_of_split("test"))
