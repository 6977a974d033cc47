"""Import pre-extracted sequence features (CMU-MOSI / MOSEI as MultiBench distributes them).

The file holds {"train" | "valid" | "test": {MODALITY: [N, T, D], ..., "labels": [N, 1] or
[N, 1, 1], "id": [N, ...]}}; modality names and sizes come from the file. A pickle is read by
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

from msa.cache.features import FeatureWriter, feature_path, is_complete
from msa.cache.fingerprint import FORMAT_VERSION, config_id, file_digest, slug
from msa.cache.manifest import SCHEMA, Manifest, write_manifest
from msa.pipeline.mvsa import DataError

SPLITS = {"train": "train", "valid": "val", "test": "test"}  # pickle key -> manifest split
NOT_MODALITIES = ("labels", "id", "ids")


@dataclasses.dataclass
class ImportResult:
    manifest: Manifest
    feature_sets: dict[str, Path]  # modality -> finished feature set
    shapes: dict[str, dict[str, tuple]]  # split -> modality -> [N, T, D]
    nonfinite: dict[str, dict[str, int]]  # split -> modality -> values replaced by 0


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
                return SafeUnpickler(f).load()
            except UnicodeDecodeError:  # written by Python 2, as some releases of these files are
                f.seek(0)
                return SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a readable feature pickle: {err}") from err


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

    with h5py.File(path, "r") as f:
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


def check_split(path: Path, key: str, part) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """(modality arrays [N, T, D] float32, scores [N], ids) of one split, or a DataError saying what is wrong."""
    if not isinstance(part, dict):
        raise DataError(f"{path}: split '{key}' is a {type(part).__name__}, expected a dict of arrays")
    if "labels" not in part:
        raise DataError(f"{path}: split '{key}' has no 'labels'")
    arrays = {}
    for name, value in part.items():
        if name in NOT_MODALITIES:
            continue
        try:
            array = np.asarray(value, dtype=np.float32)
        except ValueError:
            raise DataError(f"{path}: '{key}/{name}' is ragged (its sequences differ in shape); "
                            "pad them to one length first") from None
        if array.ndim != 3:
            raise DataError(f"{path}: '{key}/{name}' has shape {list(array.shape)}, expected [N, T, D]")
        arrays[name] = array
    if not arrays:
        raise DataError(f"{path}: split '{key}' holds no modality arrays, only {sorted(part)}")
    labels = np.asarray(part["labels"], dtype=np.float64)
    n = len(next(iter(arrays.values())))
    if labels.shape not in ((n,), (n, 1), (n, 1, 1)):
        raise DataError(f"{path}: '{key}/labels' has shape {list(labels.shape)}, expected [N, 1] or [N, 1, 1] "
                        f"with N = {n}")
    for name, array in arrays.items():
        if len(array) != n:
            raise DataError(f"{path}: '{key}/{name}' has {len(array)} rows, the other modalities {n}")
    ids = part.get("id", part.get("ids"))
    guids = [_guid(v) for v in ids] if ids is not None else [f"{key}-{i}" for i in range(n)]
    if len(guids) != n:
        raise DataError(f"{path}: '{key}/id' has {len(guids)} entries for {n} rows")
    return arrays, labels.reshape(n), guids


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
    splits = {key: check_split(path, key, data[key]) for key in SPLITS}
    modalities = list(splits["train"][0])
    for key, (arrays, _, _) in splits.items():
        if list(arrays) != modalities:
            raise DataError(f"{path}: split '{key}' has modalities {list(arrays)}, 'train' has {modalities}")
        for name in modalities:
            if arrays[name].shape[1:] != splits["train"][0][name].shape[1:]:
                raise DataError(f"{path}: '{key}/{name}' is {list(arrays[name].shape[1:])} per item, "
                                f"'train/{name}' {list(splits['train'][0][name].shape[1:])}")

    nonfinite = {SPLITS[key]: {} for key in SPLITS}
    for key, (arrays, _, _) in splits.items():
        for name, array in arrays.items():
            bad = ~np.isfinite(array)
            nonfinite[SPLITS[key]][name] = int(bad.sum())
            array[bad] = 0.0  # audio features hold +-inf in the distributed files

    guids = [g for key in SPLITS for g in splits[key][2]]
    if len(set(guids)) != len(guids):  # ids repeat across splits in some releases: keep rows apart
        guids = [f"{SPLITS[key]}/{g}" for key in SPLITS for g in splits[key][2]]
    scores = np.concatenate([splits[key][1] for key in SPLITS])
    split_column = [SPLITS[key] for key in SPLITS for _ in splits[key][2]]
    source = file_digest(path)
    n = len(guids)
    table = pa.table({"guid": guids, "split": split_column, "label": [None] * n, "text": [""] * n,
                      "text_encoding": ["none"] * n, "image_path": [""] * n, "flags": [[] for _ in range(n)]},
                     schema=SCHEMA).append_column("score", pa.array(scores, type=pa.float64()))
    info = {"data_dir": str(path.resolve()), "task": "regression", "source_digest": source,
            "manifest_id": config_id({"source": source, "guids": guids, "splits": split_column})}
    manifest = Manifest(table, info)
    write_manifest(manifest, cache)

    feature_sets = {}
    for name in modalities:
        tokens = np.concatenate([splits[key][0][name] for key in SPLITS])
        fingerprint = {"format_version": FORMAT_VERSION, "modality": name, "manifest_id": manifest.manifest_id,
                       "model": f"imported:{path.name}", "weights": source, "dtype": "float16",
                       "nonfinite": "zeroed"}
        set_path = feature_path(cache, f"{name}-{slug(path.stem)}-{config_id(fingerprint)}")
        if not is_complete(set_path, fingerprint):
            mask = sequence_mask(tokens)
            pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            notes = {"imported_from": str(path.resolve()), "nonfinite": {s: v[name] for s, v in nonfinite.items()}}
            with FeatureWriter(set_path, fingerprint, guids, np.arange(n), notes) as writer:
                writer.write(np.arange(n), pooled, tokens, mask)
                writer.finish()
        feature_sets[name] = set_path
    shapes = {SPLITS[key]: {m: tuple(a.shape) for m, a in arrays.items()} for key, (arrays, _, _) in splits.items()}
    return ImportResult(manifest, feature_sets, shapes, nonfinite)


def summary_table(result: ImportResult) -> Table:
    table = Table(title=f"Imported {len(result.manifest)} items ({result.manifest.info['data_dir']})",
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
