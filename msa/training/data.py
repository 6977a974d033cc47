"""What a train-head run reads: one current feature set per modality of a cache, loaded once
into memory with its targets (a sweep shares one across its runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from msa.cache.features import (
    CacheError,
    FeatureSet,
    PublishedSet,
    find_feature_set,
    scan_feature_sets,
)
from msa.cache.manifest import MANIFEST_FILE, Manifest, read_manifest
from msa.core.config import ConfigError
from msa.models.build import SPLIT_OPTIONS
from msa.training.bank import FeatureBank, class_targets
from msa.training.tasks import TASKS, Task

MODALITY_ORDER = ("text", "image")  # roles of two-modality heads: the first is the "text" role


@dataclasses.dataclass
class TrainData:
    """What a run reads, loaded once; a sweep shares one across its runs."""

    manifest: Manifest
    feature_sets: dict[str, FeatureSet]  # modality -> set, in role order
    bank: FeatureBank
    targets: torch.Tensor  # [N] class index, -1 for unlabelled rows; regression: float scores
    task: Task

    def restricted(self, modalities: tuple[str, ...]) -> TrainData:
        """The same data with only some modalities, in that order (a sweep over --modalities)."""
        unknown = [m for m in modalities if m not in self.feature_sets]
        if unknown:
            raise ConfigError(f"--modalities {','.join(unknown)}: the data has {', '.join(self.feature_sets)}")
        return dataclasses.replace(self, feature_sets={m: self.feature_sets[m] for m in modalities},
                                   bank=self.bank.subset(modalities))


def select_feature_sets(cache: Path, manifest: Manifest, names: tuple[str, ...],
                        modalities: tuple[str, ...] = ()) -> dict[str, FeatureSet]:
    """One current feature set per modality, in role order. The modalities are --modalities,
    else every modality the cache holds a set of: a stale or damaged set fails the run, naming
    it, rather than leaving its modality out. --features picks among several sets of one modality."""
    published = scan_feature_sets(cache)
    if not published:
        raise CacheError(f"{cache}: no complete feature sets; run `msa extract` first")
    current: dict[str, list[FeatureSet]] = {}
    for entry in published:
        if entry.feature_set and entry.feature_set.fingerprint.get("manifest_id") == manifest.manifest_id:
            current.setdefault(entry.feature_set.fingerprint["modality"], []).append(entry.feature_set)
    named: dict[str, FeatureSet] = {}
    for name in names:
        feature_set = find_feature_set(cache, name.removesuffix(".h5"))
        if feature_set.fingerprint.get("manifest_id") != manifest.manifest_id:
            raise CacheError(stale_message(cache, feature_set.name))
        modality = feature_set.fingerprint["modality"]
        if modality in named:
            raise ConfigError(f"--features names two {modality} sets ({named[modality].name}, {feature_set.name})")
        named[modality] = feature_set
    held = {modality_of(entry) for entry in published} | set(current)
    wanted = modalities or tuple(sorted(held, key=role_order))
    chosen = {}
    for modality in wanted:
        if modality in named:
            chosen[modality] = named[modality]
        elif len(current.get(modality, [])) == 1:
            chosen[modality] = current[modality][0]
        elif current.get(modality):
            raise CacheError(f"{cache} holds {len(current[modality])} {modality} feature sets "
                             f"({', '.join(s.name for s in current[modality])}); choose with --features")
        elif modality in held:
            others = [m for m in wanted if m != modality]
            raise CacheError(unusable_message(cache, published, modality, others))
        else:
            raise ConfigError(f"--modalities {modality}: {cache} has {', '.join(sorted(held, key=role_order))}")
    unused = [m for m in named if m not in chosen]
    if unused:
        raise ConfigError(f"--features names a {unused[0]} set, but the run reads {', '.join(chosen)} "
                         f"(--modalities)")
    return chosen


def modality_of(entry: PublishedSet) -> str:
    """A set's modality; from its name (which starts with it) when the file is unreadable."""
    return entry.feature_set.fingerprint["modality"] if entry.feature_set else entry.name.split("-")[0]


def role_order(modality: str) -> tuple:
    return MODALITY_ORDER.index(modality) if modality in MODALITY_ORDER else 99, modality


def stale_message(cache: Path, name: str) -> str:
    return (f"{cache}: feature set {name} was extracted for another manifest (the data, --val-ratio or "
            f"--split-seed changed since); rerun `msa extract` with the current options to encode it again")


def unusable_message(cache: Path, published: list[PublishedSet], modality: str, others: list[str]) -> str:
    """Why no set of a modality can be read, and the two ways on."""
    entry = next(e for e in published if modality_of(e) == modality)
    reason = stale_message(cache, entry.name) if entry.feature_set else str(entry.error)
    alternative = f", or train without {modality}: --modalities {','.join(others)}" if others else ""
    return f"no usable {modality} features: {reason}{alternative}"


def load_train_data(cache: Path, features: tuple[str, ...], with_tokens: bool,
                    split_names: tuple[str, ...] = (), modalities: tuple[str, ...] = (),
                    task_name: str = "auto", split_counts: dict | None = None) -> TrainData:
    """task_name: auto reads the cache's own task; classification also serves imported
    regression data, on the 3-class labels the import derived. split_counts: the layers or
    stages a run unfreezes per modality, checked against the sets' splits before any is loaded."""
    manifest = read_manifest(cache)
    feature_sets = select_feature_sets(cache, manifest, features, modalities)
    require_splits(feature_sets, split_counts or {})
    for feature_set in feature_sets.values():
        feature_set.require_rows_of(manifest.guids, Path(cache) / MANIFEST_FILE)
    bank = FeatureBank.load(feature_sets, with_tokens, split_names)
    task = TASKS[task_of(manifest.table.column_names) if task_name == "auto" else task_name]
    if task.is_regression:
        if "score" not in manifest.table.column_names:
            raise ConfigError(f"--task regression: {cache} holds class labels, no scores")
        targets = torch.tensor(manifest.column("score"), dtype=torch.float32)
    else:
        if task.name != "classification" and "score" not in manifest.table.column_names:
            raise ConfigError(f"--task {task.name} derives its classes from scores; {cache} holds class labels only")
        targets = class_targets(task.labels(manifest), task.classes)
        if not (targets >= 0).any():
            raise ConfigError(f"--task {task.name}: {cache} holds no class labels")
    return TrainData(manifest, feature_sets, bank, targets, task)


def require_splits(feature_sets: dict[str, FeatureSet], counts: dict) -> None:
    """Each unfrozen modality's set holds the activation entering exactly that many top layers
    (a count against "all" is left to build_tops, which knows the encoder's depth)."""
    for modality, count in counts.items():
        if modality not in feature_sets:
            continue  # build_tops names it: the run reads no such features
        key, option = SPLIT_OPTIONS[modality]
        cached = feature_sets[modality].fingerprint.get(key)
        if cached is None:
            raise CacheError(f"{feature_sets[modality].name} holds no split activations; extract with {option} "
                             f"{count} to unfreeze {count}")
        if isinstance(cached, int) and isinstance(count, int) and cached != count:
            raise CacheError(f"{feature_sets[modality].name} was extracted with {option} {cached}; unfreezing "
                             f"{count} needs {option} {count}")


def task_of(manifest_columns: list[str]) -> str:
    """Regression where the items carry float scores (imported MOSI-style data), else classification."""
    return "regression" if "score" in manifest_columns else "classification"
