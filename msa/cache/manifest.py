"""The Parquet manifest: one row per item, the row order every feature set follows."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msa.core.errors import CacheError, write_error
from msa.core.fingerprint import config_id, file_size
from msa.data.folds import stratified_folds
from msa.data.mvsa import Item, bad_image_flag

MANIFEST_FILE = "manifest.parquet"
# Every manifest stores a K-fold assignment of its labelled items, so every cross-validation of a
# cache (train-head, finetune, sweep, bench) is judged on the same folds whatever the code's version.
FOLDS = 5
FOLD_SEED = 42  # folds depend on the data alone, never on a run's seed
LABELLED_SPLITS = ("train", "val")  # test items carry no label a fold could use
SCHEMA = pa.schema(
    [
        ("guid", pa.string()),
        ("split", pa.string()),  # train | val | test
        ("label", pa.string()),  # null for unlabelled items
        ("text", pa.string()),
        ("text_encoding", pa.string()),
        ("image_path", pa.string()),
        ("flags", pa.list_(pa.string())),
    ]
)


@dataclasses.dataclass
class Manifest:
    table: pa.Table
    info: dict  # data_dir, val_ratio, split_seed, on_bad_image, manifest_id

    @property
    def manifest_id(self) -> str:
        return self.info["manifest_id"]

    @property
    def guids(self) -> list[str]:
        return self.table.column("guid").to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def image_sources(self) -> list[str | None]:
        """Each row's image path, None where the image is missing or unreadable (fed as a blank one)."""
        return [None if bad_image_flag(flags) else path
                for path, flags in zip(self.column("image_path"), self.column("flags"))]

    def rows_of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.column("split")) == split)

    def labelled_rows(self) -> np.ndarray:
        return np.flatnonzero(np.isin(self.column("split"), LABELLED_SPLITS))

    def folds(self, k: int) -> np.ndarray:
        """[N] fold of each row (-1: not labelled): the stored assignment for K = FOLDS, the same
        stratified deal computed for another K (older manifests, without the column, compute it too)."""
        if self.info.get("folds") == k and "fold" in self.table.column_names:
            return np.asarray(self.column("fold"), dtype=np.int64)
        return fold_column(self.column("split"), self.strata(), k)

    def write_folds(self, k: int, path: Path) -> np.ndarray:
        """`guid,fold` of every labelled row to path (a cross-validation's record); returns folds(k)."""
        folds = self.folds(k)
        labelled = np.flatnonzero(folds >= 0)
        guids = self.guids
        with open(path, "w", newline="", encoding="utf-8") as f:  # csv: a guid may hold , or "
            writer = csv.writer(f)
            writer.writerow(["guid", "fold"])
            writer.writerows([guids[r], int(folds[r])] for r in labelled)
        return folds

    def strata(self) -> list:
        """What folds are stratified by: the label; regression scores are not classes, so one stratum."""
        if "score" in self.table.column_names:
            return ["score"] * len(self)
        return self.column("label")


def fold_column(splits: list[str], strata: list, k: int) -> np.ndarray:
    labelled = np.flatnonzero(np.isin(splits, LABELLED_SPLITS))
    column = np.full(len(splits), -1, dtype=np.int64)
    column[labelled] = stratified_folds([strata[r] for r in labelled], k, FOLD_SEED)
    return column


def with_folds(manifest: Manifest) -> Manifest:
    """The manifest with its stored K-fold assignment (column `fold`, info["folds"])."""
    table = manifest.table
    if "fold" in table.column_names:
        table = table.drop_columns(["fold"])
    column = fold_column(table.column("split").to_pylist(), Manifest(table, manifest.info).strata(), FOLDS)
    return Manifest(table.append_column("fold", pa.array(column, type=pa.int8())), {**manifest.info, "folds": FOLDS})


def stratified_split(labels: list[str], val_ratio: float, seed: int) -> list[str]:
    """Assign train/val to labelled items: per class, a seeded shuffle puts the first
    round(n * val_ratio) into val. Unlike scikit-learn's splitter it accepts classes of
    one item, which small or filtered data sets have."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels, dtype=object)
    splits = np.full(len(labels), "train", dtype=object)
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels_array == label)
        n_val = int(np.floor(len(members) * val_ratio + 0.5))
        splits[rng.permutation(members)[:n_val]] = "val"
    return splits.tolist()


def paper_split(n: int, seed: int) -> list[str]:
    """The MVSA papers' split: a seeded shuffle of the labelled posts dealt 8:1:1 to train, val, test."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    splits = np.full(n, "test", dtype=object)
    splits[order[:n_train]] = "train"
    splits[order[n_train:n_train + n_val]] = "val"
    return splits.tolist()


def build_manifest(items: list[Item], data_dir: Path, val_ratio: float, split_seed: int,
                   on_bad_image: str, split: str = "stratified") -> Manifest:
    labelled = [i for i in items if i.label is not None]
    dealt = paper_split(len(labelled), split_seed) if split == "paper" else \
        stratified_split([i.label for i in labelled], val_ratio, split_seed)
    splits = dict(zip([i.guid for i in labelled], dealt))
    table = pa.table(
        {
            "guid": [i.guid for i in items],
            "split": [splits.get(i.guid, "test") for i in items],
            "label": [i.label for i in items],
            "text": [i.text for i in items],
            "text_encoding": [i.text_encoding for i in items],
            "image_path": [i.image_path for i in items],
            "flags": [i.flags for i in items],
        },
        schema=SCHEMA,
    )
    info = {
        "data_dir": str(Path(data_dir).resolve()),
        "val_ratio": val_ratio,
        "split_seed": split_seed,
        "on_bad_image": on_bad_image,
        "split": split,
    }
    # The id covers what features depend on (items, texts, flags, image files), not
    # where the data lies, so a moved data set keeps its cached features.
    content = {
        "items": [[i.guid, i.label, i.text, i.flags, file_size(i.image_path)] for i in items],
        "splits": table.column("split").to_pylist(),
    }
    info["manifest_id"] = config_id(content)
    return with_folds(Manifest(table, info))


def write_manifest(manifest: Manifest, cache_dir: Path) -> Path:
    """Write atomically: a crash or a full disk never leaves a half-written manifest behind."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / MANIFEST_FILE
    table = manifest.table.replace_schema_metadata({"msa": json.dumps(manifest.info)})
    tmp = path.with_suffix(".parquet.tmp")
    try:
        pq.write_table(table, tmp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    os.replace(tmp, path)
    return path


def _manifest_path(cache_dir: Path) -> Path:
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `msa extract --data DIR --cache {cache_dir}` first")
    return path


def _damaged(path: Path, err: Exception) -> CacheError:
    return CacheError(f"{path}: the manifest is unreadable ({str(err).splitlines()[0]}); rerun `msa extract` "
                      "(or `msa import-features`) to rebuild it: feature sets of the same data stay valid")


def manifest_columns(cache_dir: Path) -> list[str]:
    """The manifest's column names, from the Parquet footer alone (no rows are read)."""
    path = _manifest_path(cache_dir)
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException) as err:
        raise _damaged(path, err) from None


def read_manifest(cache_dir: Path) -> Manifest:
    path = _manifest_path(cache_dir)
    try:
        table = pq.read_table(path)
        info = json.loads(table.schema.metadata[b"msa"])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
        raise _damaged(path, err) from None
    return Manifest(table.replace_schema_metadata(None), info)
