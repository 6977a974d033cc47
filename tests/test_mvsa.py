"""The MVSA reader survives messy input and says what it did."""

from __future__ import annotations

import pytest

from msa.data.mvsa import DataError, decode_text, read_mvsa


def test_decode_text_falls_back_and_records_encoding():
    assert decode_text("naïve “quote”".encode()) == ("naïve “quote”", "utf-8")
    assert decode_text("\ufeffhello".encode()) == ("hello", "utf-8")
    assert decode_text("开心 …".encode("gb18030")) == ("开心 …", "gb18030")
    # 0x81 is undefined in cp1252 and invalid alone in UTF-8 and GB18030: replacement.
    text, encoding = decode_text(b"bad \x81")
    assert encoding == "utf-8-replace" and "\ufffd" in text


def test_messy_items_get_flags_and_a_report(messy_data):
    items, report = read_mvsa(messy_data)
    by_guid = {i.guid: i for i in items}
    assert by_guid["9001"].text_encoding == "gb18030" and "happy" in by_guid["9001"].text
    assert by_guid["9002"].text_encoding == "cp1252" and by_guid["9002"].text == "love this café"
    assert by_guid["9003"].flags == ["empty_text"] and by_guid["9003"].text == ""
    assert by_guid["9004"].flags == ["missing_text"]
    assert by_guid["9005"].flags == ["missing_image"]
    assert by_guid["9006"].flags == ["corrupt_image"]  # truncated JPEG
    assert by_guid["9007"].flags == ["corrupt_image"]  # not an image at all
    assert by_guid["2"].label in {"positive", "neutral", "negative"}  # " Positive " normalised
    assert report.flags == {"empty_text": 1, "missing_text": 1, "missing_image": 1, "corrupt_image": 2,
                            "duplicate_guid": 1}
    assert any("duplicate guid 1" in note and "train.txt:" in note for note in report.notes)
    assert report.items_read == len(items) == 24 + 6 + 7
    assert report.class_counts["unlabelled"] == 6
    assert sum(report.class_counts.values()) == report.items_read


def test_bad_images_can_be_skipped(messy_data):
    items, report = read_mvsa(messy_data, on_bad_image="skip")
    guids = {i.guid for i in items}
    assert not guids & {"9005", "9006", "9007"}
    assert sorted(report.skipped) == ["9005: missing_image", "9006: corrupt_image", "9007: corrupt_image"]


def test_bad_image_can_fail_naming_the_file(messy_data):
    with pytest.raises(DataError, match=r"9005\.jpg: missing image \(listed at .*train\.txt:\d+\)"):
        read_mvsa(messy_data, on_bad_image="fail")


def test_unknown_label_names_file_and_line(messy_data):
    path = messy_data / "train.txt"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",happyish"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.txt:4: label 'happyish' is not one of negative, neutral, positive"):
        read_mvsa(messy_data)


def test_malformed_line_and_header_name_file_and_line(messy_data):
    path = messy_data / "test_without_label.txt"
    path.write_text("guid,tag\n5,null\n6;null\n")
    with pytest.raises(DataError, match=r"test_without_label\.txt:3: expected 'guid,tag'"):
        read_mvsa(messy_data)
    (messy_data / "train.txt").write_text("id,label\n1,positive\n")
    with pytest.raises(DataError, match=r"train\.txt:1: expected the header 'guid,tag'"):
        read_mvsa(messy_data)


def test_not_an_mvsa_folder(tmp_path):
    with pytest.raises(DataError, match="no train.txt here"):
        read_mvsa(tmp_path)


@pytest.mark.parametrize("layout", ["single", "multiple"])
def test_an_original_release_is_read_with_the_field_s_label_rules(layout, tmp_path):
    from msa.data.demo import make_mvsa_release

    root, expected = make_mvsa_release(tmp_path / layout, layout)
    items, report = read_mvsa(root)
    assert {i.guid: i.label for i in items} == {g: label for g, label in expected.items() if label}
    dropped = {"conflict": 10, **({"no_majority": 10} if layout == "multiple" else {})}
    assert report.release == {"layout": f"MVSA-{layout.title()}", "posts": 60, "dropped": dropped}
    named = {bad["guid"]: bad for bad in report.bad_items}
    assert {g for g, label in expected.items() if label is None} == set(named)
    assert named["2"]["where"].endswith("labelResultAll.txt:3") and named["2"]["problem"].startswith("conflict")


@pytest.mark.parametrize("line", ["7\tpositive", "7\tpositive,happy", "7\tpositive,negative\tneutral,neutral"])
def test_a_bad_release_line_names_file_and_line(line, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "labelResultAll.txt").write_text(f"ID\ttext,image\n1\tpositive,positive\n{line}\n")
    with pytest.raises(DataError, match=r"labelResultAll.txt:3: "):
        read_mvsa(tmp_path)


def test_the_paper_split_is_8_1_1_and_evaluate_scores_its_test_posts(tiny_models, tmp_path):
    """extract --split paper: 8:1:1 of the labelled posts, stored in the manifest and kept by a
    rerun; CACHE/test_labels.txt is what evaluate --labels takes, and the folds leave test out."""
    from collections import Counter

    from msa.cache.manifest import read_manifest
    from msa.core.config import EvaluateConfig, ExtractConfig, TrainHeadConfig
    from msa.data.demo import make_mvsa_release
    from msa.stages import evaluate, extract, train_head

    root, expected = make_mvsa_release(tmp_path / "release", "multiple", n_posts=120)
    cfg = ExtractConfig(data=root, cache=tmp_path / "cache", text_model=tiny_models["text"], max_len=16,
                        image_model="timm:test_efficientnet", image_weights=tiny_models["image_weights"],
                        split="paper", precision="fp32")
    extract.run(cfg, show_progress=False)
    manifest = read_manifest(cfg.cache)
    kept = sum(1 for label in expected.values() if label)
    assert Counter(manifest.column("split")) == {"train": int(kept * 0.8), "val": int(kept * 0.1),
                                                 "test": kept - int(kept * 0.8) - int(kept * 0.1)}
    test = {g for g, s in zip(manifest.guids, manifest.column("split")) if s == "test"}
    assert all(manifest.folds(5)[i] == -1 for i, g in enumerate(manifest.guids) if g in test)
    labels_file = cfg.cache / extract.TEST_LABELS_FILE
    assert {line.split(",")[0] for line in labels_file.read_text().splitlines()[1:]} == test
    run = train_head.run(TrainHeadConfig(cache=cfg.cache, fusion="concat", epochs=2, precision="fp32",
                                         out=tmp_path / "run"),
                         log=lambda *_: None).run_dir
    report = evaluate.run(EvaluateConfig(run=run, labels=labels_file))
    assert sum(c["support"] for c in report["metrics"]["per_class"].values()) == len(test)
    extract.run(cfg, show_progress=False)  # a rerun keeps the split
    assert read_manifest(cfg.cache).manifest_id == manifest.manifest_id
