"""One dataclass config per stage. Defaults live here only; the CLI makes one option per
field, with the field's comment as its help and a Literal's values as its choices."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Pooling = Literal["mean", "cls"]
OnBadImage = Literal["blank", "skip", "fail"]
OnDuplicate = Literal["first-if-same", "first", "error"]
TextSource = Literal["raw", "caption", "raw+caption"]
TextNormalise = Literal["none", "tweet"]
Backend = Literal["transformers", "lavis"]
Task = Literal["auto", "classification", "regression", "classification-2", "classification-7"]
Loss = Literal["ce", "weighted-ce", "focal", "l1", "mse", "huber"]
Select = Literal["macro_f1", "accuracy", "loss", "mae", "corr"]
SequenceEncoder = Literal["lstm", "transformer"]
OutputScaling = Literal["tanh", "sigmoid", "clip"]
ImageAug = Literal["none", "weak", "strong"]
Split = Literal["test", "val", "train", "all"]
DataSplit = Literal["stratified", "paper"]
SearchKind = Literal["grid", "optuna"]
ImageDecode = Literal["auto", "cpu", "device"]
SweepBackend = Literal["local", "ray"]


def layer_count(value: int | str | None) -> int | str | None:
    """An option's layer count as the config holds it: an int, "all", or None."""
    if value is None or isinstance(value, int) or value == "all":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"a layer count is a number or 'all', got {value!r}")


def resolve_layer_count(value: int | str, total: int, option: str) -> int:
    """A layer count as a number, for an encoder of `total` layers (or stages)."""
    count = total if value == "all" else value
    if not isinstance(count, int) or not 1 <= count <= total:
        raise ConfigError(f"{option} must be between 1 and {total} (or all) for this model, got {value}")
    return count


class ConfigError(ValueError):
    """An option value that cannot work (a bad choice, a missing split); the message names the option."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number option may take, stated beside its field: `Annotated[int, Range(1)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded (a rate must be > 0)
    high_open: bool = False

    def admits(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(p for p in (low, high) if p)


# The ranges options share; a field's Annotated metadata says which applies.
Positive = Range(1)  # counts: epochs, batch sizes, widths
NonNegative = Range(0)
Rate = Range(0, low_open=True)  # learning rates
Share = Range(0, 1)  # ratios and weights in [0, 1]
Probability = Range(0, 1, high_open=True)  # dropouts: 1 would drop everything
Decay = Range(0, 1, low_open=True)  # a factor per layer
Count = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
PositiveFloat = Annotated[float, Rate]
NonNegativeFloat = Annotated[float, NonNegative]
Fraction = Annotated[float, Probability]
Ratio = Annotated[float, Share]
DecayFactor = Annotated[float, Decay]
LayerCount = NonNegativeInt | Literal["all"]  # top layers or stages of an encoder: a number, or all


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def why(err: ConfigError) -> str:
    """What an option must be, from its error: `must be >= 1`."""
    return str(err).split(" ", 1)[-1].rsplit(", got ", 1)[0].removeprefix("must be ")


TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def check_value(field: str, hint: Any, value: Any) -> None:
    """One option's value against its declared type, choices and range (ConfigError naming it)."""
    bounds = None
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        bounds = next((e for e in extras if isinstance(e, Range)), None)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(field, option, value)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            f"{option_name(field)} must be {' or '.join(why(e) for e in errors)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{option_name(field)} must be one of {', '.join(map(str, args))}, "
                              f"got {value!r}{hint_text}")
        return
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise ConfigError(f"{option_name(field)} must be a list, got {value!r}")
        for item in value:
            check_value(field, Annotated[args[0], bounds] if bounds else args[0], item)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{option_name(field)} must be a mapping, got {value!r}")
        return
    if hint is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{option_name(field)} must be a path, got {value!r}")
        return
    if hint in (bool, str, int, float):
        # bool is an int to Python, but `--epochs true` is a mistake, not one epoch
        exact = type(value) is hint or (hint is float and type(value) is int)
        if not exact:
            raise ConfigError(f"{option_name(field)} must be {TYPE_NAMES[hint]}, got {value!r}")
        if hint is float and not math.isfinite(value):
            raise ConfigError(f"{option_name(field)} must be a finite number, got {value!r}")
        if bounds and hint is not bool and not bounds.admits(value):
            raise ConfigError(f"{option_name(field)} must be {bounds}, got {value!r}")
        return
    if dataclasses.is_dataclass(hint) and not isinstance(value, hint):
        raise ConfigError(f"{field} must be a {hint.__name__}, got {type(value).__name__}")


@functools.cache
def declared_types(config_class: type) -> dict[str, Any]:
    """Each field's type with its Annotated range (resolved once per class: configs are made often)."""
    return typing.get_type_hints(config_class, include_extras=True)


class Checked:
    """A stage config checked when made: every field against its type, choices and range, in
    one place, so that a bad option stops a command before it writes anything."""

    def __post_init__(self) -> None:
        hints = declared_types(type(self))
        for field in dataclasses.fields(self):
            check_value(field.name, hints[field.name], getattr(self, field.name))


@dataclasses.dataclass
class ExtractConfig(Checked):
    data: Path  # MVSA folder: train.txt, test_without_label.txt, data/{guid}.txt|jpg
    cache: Path = Path("msa-cache")  # one cache directory per data set
    text_model: str = "roberta-base"  # HF hub id or local model directory
    max_len: Count = 128  # tokens kept per text (longer texts are truncated)
    pooling: Pooling = "mean"  # how the pooled text feature is made
    pool_layers: Count = 1  # the pooled text feature averaged over the last K layers (1: the last only)
    image_model: str = "resnet50"  # torchvision name or timm:NAME
    image_weights: str | None = None  # local state dict instead of downloaded weights
    on_bad_image: OnBadImage = "blank"  # blank: a mean-colour image and a flag; skip: leave the item out
    on_duplicate: OnDuplicate = "first-if-same"  # a guid listed twice; first-if-same: conflicting labels stop
    val_ratio: Fraction = 0.2  # stratified share of labelled items held out for validation
    split_seed: int = 42  # seed of the train/val(/test) split
    # paper: every labelled post dealt 8:1:1 to train/val/test (test labels kept for evaluate), as MVSA papers do
    split: DataSplit = "stratified"  # stratified: labelled posts to train/val by --val-ratio, the unlabelled to test
    device: Device = "auto"  # auto: cuda when there is one
    precision: Precision = "auto"  # auto: on CPU the fastest of fp32/bf16 (and compile) measured here; CUDA: bf16/fp16
    compile: bool = False  # always torch.compile the image encoder (else: from 1,000 images on CPU, if measured faster)
    batch_size: Count = 32  # items per encoder batch
    image_decode: ImageDecode = "auto"  # device: JPEG batches decoded where the encoder runs (nvJPEG); auto: on CUDA
    limit: Count | None = None  # only the first N listed items: a quick trial
    shard: str | None = None  # "i/n": encode the i-th of n disjoint shares (0-based); join with `msa cache merge`
    modalities: tuple[str, ...] = ("text", "image")  # which feature sets to build
    text_source: TextSource = "raw"  # raw+caption: post text <sep> caption (captions from `msa caption`)
    captions: str | None = None  # caption set for caption sources; default: the one set in the cache
    text_normalise: TextNormalise = "none"  # tweet: URLs, @mentions to placeholders, #HashTags and emoji to words
    text_split_layer: LayerCount | None = None  # also cache the input of the top K text layers (all: the embeddings)
    image_split_stage: LayerCount | None = None  # also cache the activation entering the last K image stages (or all)


TEXT_SOURCES = get_args(TextSource)


@dataclasses.dataclass
class CaptionConfig(Checked):
    data: Path  # MVSA folder, as for extract
    cache: Path = Path("msa-cache")  # captions go to CACHE/captions/, beside the feature sets
    backend: Backend = "transformers"  # lavis runs in its own Python environment (see README)
    model: str = "Salesforce/blip-image-captioning-base"  # HF id or local dir; lavis: base_coco | large_coco
    batch_size: Count = 16  # images per generate call
    num_beams: Count = 1  # 1: greedy; more: beam search
    max_new_tokens: Count = 20  # the longest caption, in tokens
    prompt: str | None = None  # e.g. "a picture of": conditions the caption, stripped from the stored text
    device: Device = "auto"  # auto: cuda when there is one
    precision: Precision = "auto"  # auto: on CPU BLIP's weights in the faster of fp32/bf16 measured here; CUDA: fp16
    compile: bool | None = None  # torch.compile the vision encoder; None: when 200+ images are pending on CPU
    lavis_python: str | None = None  # the interpreter of the environment lavis is installed in
    limit: Count | None = None  # only the first N listed items


def to_json(config: Any) -> dict:
    """A config as plain JSON values (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def read_config_file(path: Path) -> dict:
    """TOML, YAML or JSON, by the file's suffix (--config, --space); the keys are option names."""
    text = Path(path).read_text()
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def from_record(config_class: type, record: dict, **overrides) -> Any:
    """A config from its JSON record (to_json's output) or a command's options: keys that are not
    fields are ignored, fields missing from the record keep their defaults, lists become tuples."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in fields}
    return config_class(**{**values, **overrides})


def default(config_class: type, field: str) -> Any:
    """The default of one field, for CLI options that must not repeat it."""
    value = config_class.__dataclass_fields__[field].default
    if value is dataclasses.MISSING:
        raise KeyError(f"{config_class.__name__}.{field} has no default")
    return value


@dataclasses.dataclass
class TrainHeadConfig(Checked):
    cache: Path = Path("msa-cache")  # a cache written by `msa extract`
    fusion: str = "concat"  # the fusion head (docs/heads.md compares them)
    features: tuple[str, ...] = ()  # feature set names, picking a set where a modality has several
    out: Path | None = None  # run directory (must be new); default runs/<fusion>-seed<seed>-<time>
    epochs: Count = 20  # the most epochs (early stopping may end sooner)
    batch_size: Count | None = None  # default: the head's own (128 pooled, 64 token-level, 32 sequence)
    lr: PositiveFloat = 1e-3  # learning rate (when nothing is unfrozen)
    weight_decay: NonNegativeFloat = 0.01  # AdamW's
    warmup_ratio: Ratio = 0.1  # share of steps with a linear warm-up, then cosine decay
    dropout: Fraction | None = None  # dropout in the head; default: the head's own (0.1; tfn 0.3)
    hidden: Count = 256  # width of the head
    seed: int = 0  # seeds the initialisation and the batch order
    task: Task = "auto"  # auto: regression where items carry float scores; classification-2/-7: classes of scores
    modalities: tuple[str, ...] = ()  # a subset of the cache's modalities; default: every modality it holds
    sequence_encoder: SequenceEncoder = "lstm"  # per-modality encoder of the sequence heads
    output_scaling: OutputScaling | None = None  # how a regression output is bounded to [-3, 3]; default: the head's
    loss: Loss | None = None  # default ce (classification), l1 (regression)
    class_weights: tuple[PositiveFloat, ...] | None = None  # weighted-ce/focal, in class order; default: 1/frequency
    label_smoothing: Fraction = 0.0  # of the cross-entropy targets
    focal_gamma: NonNegativeFloat = 2.0  # the focal loss's exponent
    rdrop_alpha: NonNegativeFloat = 0.0  # R-Drop: weight of the KL between two dropout passes (0: off)
    modality_dropout: Fraction = 0.0  # per-sample probability of zeroing one modality in training
    aux_weight: NonNegativeFloat = 0.1  # weight of a head's auxiliary loss (the aligned head's contrastive term)
    select: Select | None = None  # the val metric that picks the epoch; default macro_f1 (regression: mae)
    patience: Count = 5  # epochs without improvement before stopping
    precision: Precision = "auto"  # auto: bf16 autocast where a few timed training steps say it is faster
    # Unfrozen encoder tops, run on the split activations cached by extract (0: features only).
    unfreeze_text_layers: LayerCount = 0  # train the top K text layers, or all (needs extract --text-split-layer K)
    unfreeze_image_stages: LayerCount = 0  # train the last K image stages, or all (needs extract --image-split-stage K)
    lr_encoder: PositiveFloat = 1e-5  # learning rate of unfrozen encoder layers (the top one, with --layer-decay)
    lora_rank: NonNegativeInt = 0  # LoRA adapters of this rank in the unfrozen text layers, trained in their place
    lora_targets: tuple[str, ...] = ()  # the linear layers adapted; default: the attention projections
    layer_decay: DecayFactor = 1.0  # each text layer below the top learns at this times the rate of the one above
    lr_fusion: PositiveFloat = 5e-5  # of the head's fusion layers, when something is unfrozen
    lr_head: PositiveFloat = 1e-4  # of the classifier, when something is unfrozen
    grad_accum: Count = 1  # batches per optimizer step
    grad_clip: NonNegativeFloat = 0.0  # max gradient norm (0: off)
    device: Device = "auto"  # auto: cuda when there is one
    baseline: bool = True  # also fit the task's linear model on the same split and features, to compare with
    folds: NonNegativeInt = 0  # K >= 2: K-fold cross-validation over every labelled item (0: the extract's val split)
    refit: bool = False  # then train again on train+val for the selected epochs, into RUN/refit (what predict uses)


def _shared(config_class: type, field: str) -> Any:
    """A default FinetuneConfig shares with another stage's config (stated once, there)."""
    return dataclasses.field(default=default(config_class, field))


@dataclasses.dataclass
class FinetuneConfig(Checked):
    data: Path  # MVSA folder
    out: Path | None = None  # run directory; default runs/finetune-<fusion>-seed<seed>-<time>
    text_model: str = _shared(ExtractConfig, "text_model")  # HF hub id or local model directory
    max_len: Count = _shared(ExtractConfig, "max_len")  # tokens kept per text
    pooling: Pooling = _shared(ExtractConfig, "pooling")  # how the pooled text feature is made
    image_model: str = _shared(ExtractConfig, "image_model")  # torchvision name or timm:NAME
    image_weights: str | None = None  # local state dict instead of downloaded weights
    fusion: str = _shared(TrainHeadConfig, "fusion")  # the fusion head (docs/heads.md compares them)
    hidden: Count = _shared(TrainHeadConfig, "hidden")  # width of the head
    dropout: Fraction | None = _shared(TrainHeadConfig, "dropout")  # dropout in the head; default: the head's own
    unfreeze_text_layers: LayerCount = 2  # top transformer layers trained, or all (the embeddings stay frozen)
    lora_rank: NonNegativeInt = _shared(TrainHeadConfig, "lora_rank")  # LoRA rank in the top K text layers (0: none)
    lora_targets: tuple[str, ...] = ()  # the linear layers adapted; default: the attention projections
    unfreeze_image_stages: LayerCount = 1  # last stages trained, or all (ResNet: layer4)
    lr_encoder: PositiveFloat = _shared(TrainHeadConfig, "lr_encoder")  # learning rate of the unfrozen encoder layers
    layer_decay: DecayFactor = _shared(TrainHeadConfig, "layer_decay")  # a text layer's rate: this times the one above
    lr_fusion: PositiveFloat = _shared(TrainHeadConfig, "lr_fusion")  # of the head's fusion layers
    lr_head: PositiveFloat = _shared(TrainHeadConfig, "lr_head")  # of the classifier
    weight_decay: NonNegativeFloat = _shared(TrainHeadConfig, "weight_decay")  # AdamW's
    warmup_ratio: Ratio = _shared(TrainHeadConfig, "warmup_ratio")  # share of steps warming up, then cosine decay
    epochs: Count = 5  # an epoch end to end costs what a whole cached run does
    batch_size: Count = 16  # items per step (times --grad-accum)
    grad_accum: Count = _shared(TrainHeadConfig, "grad_accum")  # batches per optimizer step
    grad_clip: NonNegativeFloat = 1.0  # max gradient norm (0: off)
    loss: Loss | None = None  # ce | weighted-ce | focal (default ce)
    class_weights: tuple[PositiveFloat, ...] | None = None  # weighted-ce/focal, in class order; default: 1/frequency
    label_smoothing: Fraction = _shared(TrainHeadConfig, "label_smoothing")  # of the cross-entropy targets
    focal_gamma: NonNegativeFloat = _shared(TrainHeadConfig, "focal_gamma")  # the focal loss's exponent
    rdrop_alpha: NonNegativeFloat = _shared(TrainHeadConfig, "rdrop_alpha")  # R-Drop: weight of the KL of two passes
    select: Select | None = None  # the val metric that picks the epoch: macro_f1 | accuracy | loss (default macro_f1)
    patience: Count = 3  # epochs without improvement before stopping
    seed: int = _shared(TrainHeadConfig, "seed")  # seeds the initialisation, the batch order and augmentation
    image_aug: ImageAug = "none"  # weak: crop, flip, colour jitter; strong: weak + RandAugment
    clean_text: bool = False  # drop URLs and @mentions, unwrap #tags, collapse whitespace
    val_ratio: Fraction = _shared(ExtractConfig, "val_ratio")  # the split `msa extract` makes with this ratio and seed
    split_seed: int = _shared(ExtractConfig, "split_seed")  # seed of the stratified train/val split
    on_bad_image: OnBadImage = _shared(ExtractConfig, "on_bad_image")  # blank | skip | fail
    on_duplicate: OnDuplicate = _shared(ExtractConfig, "on_duplicate")  # a guid listed twice
    limit: Count | None = None  # only the first N listed items: a quick trial
    device: Device = _shared(ExtractConfig, "device")  # auto: cuda when there is one
    precision: Precision = _shared(ExtractConfig, "precision")  # AMP; auto: CUDA bf16/fp16, CPU the faster measured
    folds: NonNegativeInt = _shared(TrainHeadConfig, "folds")  # K >= 2: K-fold cross-validation, RUN/fold-k each
    refit: bool = _shared(TrainHeadConfig, "refit")  # then train on every label for the selected epochs, into RUN/refit


@dataclasses.dataclass
class SweepConfig(Checked):
    base: TrainHeadConfig  # every run starts from this config
    out: Path = Path("runs/sweep")  # one sub-directory per run, results.csv/parquet here; a sweep's resumes
    fusions: tuple[str, ...] = ("concat",)  # heads, comma-separated
    seeds: tuple[int, ...] = (0, 1, 2)  # seeds, comma-separated
    grid: dict[str, tuple] = dataclasses.field(default_factory=dict)  # TrainHeadConfig field -> values
    workers: Count = 1  # processes sharing the CPU threads (2 cores: 12 pooled-head runs 30.8 s -> 26.8 s)
    backend: SweepBackend = "local"  # local: worker processes here; ray: tasks on a Ray cluster (msa[ray])
    address: str | None = None  # the Ray cluster's address (auto, ray://HOST:10001); default: start one here
    search: SearchKind = "grid"  # grid: every combination; optuna: TPE trials with pruning (the first seed)
    trials: Count = 30  # optuna: trials to finish (pruned ones count)
    space: Path | None = None  # optuna: TOML/YAML/JSON search space; default: lr, weight_decay, dropout, hidden


@dataclasses.dataclass
class ReportConfig(Checked):
    target: Path  # a run directory or a sweep directory
    out: Path | None = None  # the HTML file; default TARGET/report.html
    worst: Count = 8  # posts shown per run: the most confidently wrong


SPLITS = get_args(Split)


@dataclasses.dataclass
class PredictConfig(Checked):
    run: Path  # a run directory from train-head or finetune
    data: Path | None = None  # raw MVSA data; default: the data the run was trained on
    split: Split = "test"  # which items to predict
    out: Path | None = None  # default RUN/predictions-<split>.txt; new data: RUN/predictions-<data>-<id>-<split>.txt
    cache: Path | None = None  # default: the run's cache for its own data, RUN/predict-cache otherwise
    device: Device = "auto"  # auto: cuda when there is one
    probs: bool = False  # write guid,tag,p_negative,p_neutral,p_positive (regression: guid,score)
    ensemble: tuple[Path, ...] = ()  # more runs whose probabilities (or scores) are averaged with --run's
    text: str | None = None  # one post's text: predicted and printed (with --image, its picture), no file written
    image: Path | None = None  # that post's image file


@dataclasses.dataclass
class EvaluateConfig(Checked):
    run: Path  # the run to evaluate
    data: Path | None = None  # new MVSA data to score (extracted as predict does); default: the run's own
    labels: Path | None = None  # a guid,tag file; default: the run's val predictions, or --data's labelled items
    text_run: Path | None = None  # a text-only run, for the agreement analysis
    image_run: Path | None = None  # an image-only run, for the agreement analysis
    out: Path | None = None  # default: RUN/evaluation
    ensemble: tuple[Path, ...] = ()  # more runs averaged with --run (of cross-validations: out of fold)
