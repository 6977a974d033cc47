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
