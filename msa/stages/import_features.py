"""Import pre-extracted sequence features (CMU-MOSI / MOSEI as the field distributes them).

Two layouts, told apart by their keys: MultiBench's {"train" | "valid" | "test": {MODALITY:
[N, T, D], ..., "labels": [N, 1] or [N, 1, 1], "id": [N, ...]}} (modality names and sizes from
the file), and MMSA's aligned_50.pkl / unaligned_50.pkl (text, audio, vision,
regression_labels, raw_text, text_bert with the text's mask; the unaligned file's
audio_lengths / vision_lengths give those modalities' masks). A pickle is read by
an unpickler that admits numpy arrays and plain containers only (a pickle can otherwise run
any code when loaded); `.npz` (keys `train/text`, ...) and `.h5` (groups train, valid, test)
exports need no pickle at all. The result is an
ordinary cache: a manifest (splits, float scores) and one token-level feature set per
modality, so every stage 2 head, sweep and report works on it.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.table import Table

from msa.cache.features import feature_path, is_complete
from msa.cache.manifest import SCHEMA, Manifest, with_folds, write_manifest
from msa.cache.writer import FeatureWriter
from msa.core.fingerprint import FORMAT_VERSION, config_id, file_digest, slug
from msa.core.finite import require_finite
from msa.data.mvsa import DataError

SPLITS = {"train": "train", "valid": "val", "test": "test"}  # pickle key -> manifest split
NOT_MODALITIES = ("labels", "id", "ids")


@dataclasses.dataclass
class ImportResult:
    manifest: Manifest
    feature_sets: dict[str, Path]  # modality -> finished feature set
    shapes: dict[str, dict[str, tuple]]  # split -> modality -> [N, T, D]
    nonfinite: dict[str, dict[str, int]]  # split -> modality -> values replaced by 0
    layout: str = "multibench"  # the layout found: multibench, mmsa-aligned, mmsa-unaligned


# What a feature pickle may hold: numpy arrays, numpy scalars and plain containers. Any
# other global (os.system, a class with __reduce__) is refused before it is called.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"), ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("__builtin__", "object"),
    ("builtins", "object"),
}


class SafeUnpickler(pickle.Unpickler):
    """Admits only SAFE_GLOBALS: a planted __reduce__ is refused, never run."""

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, and msa loads only numpy arrays and "
                                     "plain containers from a pickle (nothing that can run code)")


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            try:
                data = SafeUnpickler(f).load()
            except UnicodeDecodeError:  # written by Python 2, as some releases of these files are
                f.seek(0)
                data = SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError,
            MemoryError) as err:
        raise DataError(f"{path}: not a readable feature pickle: {err}") from err
    check_expansion(path, data, budget=EXPANSION_PER_BYTE * path.stat().st_size + 100_000)
    return data


# A pickle refers to an object it built before by a memo index, in a few bytes: a 37 KB file of
# lists of lists of references expands to billions of values once they become arrays. Real
# feature files hold arrays (stored byte for byte) and short lists, so every value is paid for
# in the file: more containers and numbers than this per byte is a bomb, refused before use.
EXPANSION_PER_BYTE = 4


def check_expansion(path: Path, data, budget: int) -> None:
    """Count what `data` holds, references repeated as often as they occur, up to `budget`."""
    pending, seen = [data], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > budget:
            raise DataError(f"{path}: expands to over {budget:,} values from {path.stat().st_size:,} bytes "
                            "(objects referenced again and again); not a features file msa reads")
        if isinstance(item, dict):
            pending.extend(item.values())
            pending.extend(item.keys())
        elif isinstance(item, list | tuple | set | frozenset):
            pending.extend(item)
        elif isinstance(item, np.ndarray) and item.dtype == object:
            pending.extend(item.ravel().tolist())


def load_arrays(path: Path) -> dict:
    """The splits of an `.npz` (keys `SPLIT/NAME`) or `.h5` (groups SPLIT with datasets) export."""
    data: dict[str, dict] = {}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                split, _, name = key.partition("/")
                if not name:
                    raise DataError(f"{path}: key {key!r} is not SPLIT/NAME (e.g. train/text)")
                data.setdefault(split, {})[name] = npz[key]
        return data
    import h5py

    from msa.cache.contained import outside_storage, refusal

    with h5py.File(path, "r") as f:
        outside = outside_storage(f)
        if outside:
            raise DataError(refusal(path, outside))
        for split, group in f.items():
            if not isinstance(group, h5py.Group):
                raise DataError(f"{path}: {split!r} is not a group of arrays (train/valid/test)")
            data[split] = {name: (group[name].asstr()[:] if group[name].dtype.kind in "OS" else group[name][:])
                           for name in group}
    return data


def load_features(path: Path) -> dict:
    """A features file as {split: {name: array}}: `.npz` and `.h5` exports, or a pickle read safely."""
    if path.suffix in (".npz", ".h5", ".hdf5"):
        try:
            return load_arrays(path)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable {path.suffix} export ({str(err).splitlines()[0]})") from None
    return load_pickle(path)


@dataclasses.dataclass
class SplitData:
    """One split of a features file, whatever its layout."""

    arrays: dict[str, np.ndarray]  # modality -> [N, T, D] float32 (T may differ between modalities)
    masks: dict[str, np.ndarray]  # modality -> [N, T] bool, True at real steps
    scores: np.ndarray  # [N] float
    guids: list[str]
    texts: list[str]  # the raw text (MMSA's raw_text), "" where the file has none
    labels: list[str | None]  # the 3-class label (negative / neutral / positive), None where unknown


def detect_layout(path: Path, data: dict) -> str:
    """multibench, mmsa-aligned or mmsa-unaligned, from the train split's keys."""
    keys = set(data["train"]) if isinstance(data["train"], dict) else set()
    if "regression_labels" in keys:
        return "mmsa-unaligned" if any(k.endswith("_lengths") for k in keys) else "mmsa-aligned"
    if "labels" in keys:
        return "multibench"
    raise DataError(f"{path}: split 'train' has neither 'labels' (MultiBench layout) nor 'regression_labels' "
                    f"(MMSA's aligned_50.pkl / unaligned_50.pkl); it has {', '.join(sorted(map(str, keys)))}")


MMSA_KEYS = ("id", "text", "audio", "vision", "regression_labels")  # what msa reads of an MMSA split
MMSA_MODALITIES = ("text", "audio", "vision")


def read_split(path: Path, key: str, part, layout: str) -> SplitData:
    if not isinstance(part, dict):
        raise DataError(f"{path}: split '{key}' is a {type(part).__name__}, expected a dict of arrays")
    if layout.startswith("mmsa"):
        return read_mmsa_split(path, key, part, layout)
    return read_multibench_split(path, key, part)


def read_multibench_split(path: Path, key: str, part: dict) -> SplitData:
    """{MODALITY: [N, T, D], labels: [N, 1] or [N, 1, 1], id}: modalities are every other array."""
    if "labels" not in part:
        raise DataError(f"{path}: split '{key}' has no 'labels'")
    arrays = {name: sequence_array(path, key, name, value) for name, value in part.items()
              if name not in NOT_MODALITIES}
    if not arrays:
        raise DataError(f"{path}: split '{key}' holds no modality arrays, only {sorted(part)}")
    n = len(next(iter(arrays.values())))
    scores = label_array(path, key, "labels", part["labels"], n)
    for name, array in arrays.items():
        if len(array) != n:
            raise DataError(f"{path}: '{key}/{name}' has {len(array)} rows, the other modalities {n}")
    ids = part.get("id", part.get("ids"))
    guids = [_guid(v) for v in ids] if ids is not None else [f"{key}-{i}" for i in range(n)]
    if len(guids) != n:
        raise DataError(f"{path}: '{key}/id' has {len(guids)} entries for {n} rows")
    masks = {name: sequence_mask(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0))  # padding: all-zero steps
             for name, array in arrays.items()}
    return SplitData(arrays, masks, scores, guids, [""] * n, [None] * n)


def read_mmsa_split(path: Path, key: str, part: dict, layout: str) -> SplitData:
    """MMSA's layout: text [N, T, 768] (BERT), audio, vision, regression_labels [N], id, raw_text,
    text_bert [N, 3, T] (ids, mask, segments); the unaligned file adds audio_lengths / vision_lengths."""
    wanted = MMSA_KEYS + (("audio_lengths", "vision_lengths") if layout == "mmsa-unaligned" else ())
    missing = [k for k in wanted if k not in part]
    if missing:
        raise DataError(f"{path}: split '{key}' has no {', '.join(repr(k) for k in missing)} (an {layout} file "
                        f"holds {', '.join(wanted)} per split)")
    arrays = {m: sequence_array(path, key, m, part[m]) for m in MMSA_MODALITIES}
    n = len(arrays["text"])
    for name, array in arrays.items():
        if len(array) != n:
            raise DataError(f"{path}: '{key}/{name}' has {len(array)} rows, '{key}/text' {n}")
    scores = label_array(path, key, "regression_labels", part["regression_labels"], n)
    text_bert = np.asarray(part["text_bert"]) if "text_bert" in part else None
    if text_bert is not None and text_bert.shape[:2] == (n, 3) and text_bert.shape[2] == arrays["text"].shape[1]:
        text_mask = text_bert[:, 1].astype(bool)  # BERT's attention mask: the text's real tokens
    else:
        text_mask = sequence_mask(arrays["text"])
    masks = {"text": text_mask}
    for m in ("audio", "vision"):
        if layout == "mmsa-aligned":
            masks[m] = text_mask  # aligned to the text's tokens
        else:
            lengths = np.asarray(part[f"{m}_lengths"]).reshape(-1).astype(int)
            if len(lengths) != n:
                raise DataError(f"{path}: '{key}/{m}_lengths' has {len(lengths)} entries for {n} rows")
            steps = arrays[m].shape[1]
            masks[m] = np.arange(steps)[None, :] < np.clip(lengths, 1, steps)[:, None]  # padded at the end
    texts = [str(t) for t in part["raw_text"]] if "raw_text" in part else [""] * n
    return SplitData(arrays, masks, scores, [_guid(v) for v in part["id"]], texts,
                     three_class_labels(part.get("classification_labels"), scores))


def three_class_labels(classes, scores: np.ndarray) -> list[str]:
    """negative / neutral / positive: MMSA's classification_labels where they are 0/1/2, else the
    sign of the score (the field's 3-class convention)."""
    names = ("negative", "neutral", "positive")
    if classes is not None:
        values = np.asarray(classes).reshape(-1)
        if len(values) == len(scores) and set(np.unique(values).tolist()) <= {0, 1, 2}:
            return [names[int(v)] for v in values]
    return [names[int(np.sign(s)) + 1] for s in scores]


def sequence_array(path: Path, key: str, name: str, value) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except ValueError:
        raise DataError(f"{path}: '{key}/{name}' is ragged (its sequences differ in shape); "
                        "pad them to one length first") from None
    if array.ndim != 3:
        raise DataError(f"{path}: '{key}/{name}' has shape {list(array.shape)}, expected [N, T, D]")
    return array


def label_array(path: Path, key: str, name: str, value, n: int) -> np.ndarray:
    labels = np.asarray(value, dtype=np.float64)
    if labels.shape not in ((n,), (n, 1), (n, 1, 1)):
        raise DataError(f"{path}: '{key}/{name}' has shape {list(labels.shape)}, expected [N, 1] or [N, 1, 1] "
                        f"with N = {n}")
    return labels.reshape(n)


SCORE_RANGE = (-3.0, 3.0)  # sentiment scores as CMU-MOSI/MOSEI give them; the regression heads predict this range


def check_labels(path: Path, key: str, split: SplitData) -> None:
    """Every score finite and in SCORE_RANGE, every id once in its split: else a DataError naming the items."""
    scores = np.asarray(split.scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise DataError(f"{path}: split '{key}': {len(bad)} label(s) are NaN or infinite (ids "
                        f"{', '.join(split.guids[i] for i in bad[:5])})")
    low, high = SCORE_RANGE
    out = np.flatnonzero((scores < low) | (scores > high))
    if len(out):
        raise DataError(f"{path}: split '{key}': {len(out)} score(s) outside [{low:g}, {high:g}] (id "
                        f"{split.guids[out[0]]}: {scores[out[0]]:g}); msa's regression heads predict that range")
    seen: dict[str, int] = {}
    for i, guid in enumerate(split.guids):
        if guid in seen:
            raise DataError(f"{path}: split '{key}': id {guid!r} is listed twice (rows {seen[guid]} and {i}); "
                            "every item needs its own id")
        seen[guid] = i


def _guid(value) -> str:
    parts = np.ravel(np.asarray(value, dtype=object))
    return "_".join(p.decode() if isinstance(p, bytes) else str(p) for p in parts)


def sequence_mask(tokens: np.ndarray) -> np.ndarray:
    """[N, T] True at time steps that hold data. The files pad with all-zero steps (MOSI pads at
    the start); a sequence with none keeps its last step, so attention always has a key."""
    mask = np.abs(tokens).sum(-1) > 0
    mask[~mask.any(1), -1] = True
    return mask


def run(path: Path, cache: Path) -> ImportResult:
    path, cache = Path(path), Path(cache)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = load_features(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict with the splits {', '.join(SPLITS)}, got {type(data).__name__}")
    missing = [key for key in SPLITS if key not in data]
    if missing:
        raise DataError(f"{path}: no {', '.join(repr(k) for k in missing)} split (has: {', '.join(map(str, data))})")
    layout = detect_layout(path, data)
    splits = {key: read_split(path, key, data[key], layout) for key in SPLITS}
    for key, split in splits.items():
        check_labels(path, key, split)
    modalities = list(splits["train"].arrays)
    for key, split in splits.items():
        if list(split.arrays) != modalities:
            raise DataError(f"{path}: split '{key}' has modalities {list(split.arrays)}, 'train' has {modalities}")
        for name in modalities:
            if split.arrays[name].shape[1:] != splits["train"].arrays[name].shape[1:]:
                raise DataError(f"{path}: '{key}/{name}' is {list(split.arrays[name].shape[1:])} per item, "
                                f"'train/{name}' {list(splits['train'].arrays[name].shape[1:])}")

    nonfinite = {SPLITS[key]: {} for key in SPLITS}
    for key, split in splits.items():
        for name, array in split.arrays.items():
            bad = ~np.isfinite(array)
            nonfinite[SPLITS[key]][name] = int(bad.sum())
            array[bad] = 0.0  # audio features hold +-inf in the distributed files
            # As stored (float16), checked before any set is written: none is published if one cannot be.
            with np.errstate(over="ignore"):
                require_finite(array.astype(np.float16), f"{path}: '{key}/{name}' as stored in float16 (values "
                               f"past +-65504)", split.guids)

    guids = [g for key in SPLITS for g in splits[key].guids]
    if len(set(guids)) != len(guids):  # ids repeat across splits in some releases: keep rows apart
        guids = [f"{SPLITS[key]}/{g}" for key in SPLITS for g in splits[key].guids]
    scores = np.concatenate([splits[key].scores for key in SPLITS])
    split_column = [SPLITS[key] for key in SPLITS for _ in splits[key].guids]
    source = file_digest(path)
    n = len(guids)
    table = pa.table({"guid": guids, "split": split_column,
                      "label": [label for key in SPLITS for label in splits[key].labels],
                      "text": [text for key in SPLITS for text in splits[key].texts],
                      "text_encoding": ["none"] * n, "image_path": [""] * n, "flags": [[] for _ in range(n)]},
                     schema=SCHEMA).append_column("score", pa.array(scores, type=pa.float64()))
    dims = {m: list(splits["train"].arrays[m].shape[1:]) for m in modalities}
    info = {"data_dir": str(path.resolve()), "task": "regression", "source_digest": source,
            "source_format": layout, "dims": dims,
            "manifest_id": config_id({"source": source, "guids": guids, "splits": split_column})}
    manifest = with_folds(Manifest(table, info))
    write_manifest(manifest, cache)

    feature_sets = {}
    for name in modalities:
        tokens = np.concatenate([splits[key].arrays[name] for key in SPLITS])
        fingerprint = {"format_version": FORMAT_VERSION, "modality": name, "manifest_id": manifest.manifest_id,
                       "model": f"imported:{path.name}", "weights": source, "dtype": "float16",
                       "nonfinite": "zeroed", "source_format": layout}
        set_path = feature_path(cache, f"{name}-{slug(path.stem)}-{config_id(fingerprint)}")
        if not is_complete(set_path, fingerprint):
            mask = np.concatenate([splits[key].masks[name] for key in SPLITS])
            tokens = tokens * mask[..., None]  # steps past a sequence's length hold nothing
            pooled = tokens.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            notes = {"imported_from": str(path.resolve()), "nonfinite": {s: v[name] for s, v in nonfinite.items()}}
            with FeatureWriter(set_path, fingerprint, guids, np.arange(n), notes) as writer:
                writer.write(np.arange(n), pooled, tokens, mask)
                writer.finish()
        feature_sets[name] = set_path
    shapes = {SPLITS[key]: {m: tuple(a.shape) for m, a in split.arrays.items()} for key, split in splits.items()}
    return ImportResult(manifest, feature_sets, shapes, nonfinite, layout)


def summary_table(result: ImportResult) -> Table:
    table = Table(title=f"Imported {len(result.manifest)} items, {result.layout} layout "
                        f"({result.manifest.info['data_dir']})",
                  caption="non-finite: values that were +-inf or NaN, replaced by 0")
    table.add_column("split")
    table.add_column("items", justify="right")
    for modality in result.feature_sets:
        table.add_column(f"{modality} [T, D]")
        table.add_column(f"{modality} non-finite", justify="right")
    for split, shapes in result.shapes.items():
        row = [split, str(next(iter(shapes.values()))[0])]
        for modality in result.feature_sets:
            row += [str(list(shapes[modality][1:])), str(result.nonfinite[split][modality])]
        table.add_row(*row)
    return table
