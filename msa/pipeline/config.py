"""One dataclass config per stage. Defaults live here only; the CLI makes one option per
field, with the field's comment as its help and a Literal's values as its choices."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, get_args

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Pooling = Literal["mean", "cls"]
OnBadImage = Literal["blank", "skip", "fail"]
OnDuplicate = Literal["first-if-same", "first", "error"]
TextSource = Literal["raw", "caption", "raw+caption"]
Backend = Literal["transformers", "lavis"]
Task = Literal["auto", "classification", "regression", "classification-2", "classification-7"]
Loss = Literal["ce", "weighted-ce", "focal", "l1", "mse", "huber"]
Select = Literal["macro_f1", "accuracy", "loss", "mae", "corr"]
SequenceEncoder = Literal["lstm", "transformer"]
OutputScaling = Literal["tanh", "sigmoid"]
ImageAug = Literal["none", "weak", "strong"]
Split = Literal["test", "val", "train", "all"]
SweepBackend = Literal["local", "ray"]
LayerCount = int | Literal["all"]  # top layers or stages of an encoder: a number, or all of them


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


@dataclasses.dataclass
class ExtractConfig:
    data: Path  # MVSA folder: train.txt, test_without_label.txt, data/{guid}.txt|jpg
    cache: Path = Path("msa-cache")  # one cache directory per data set
    text_model: str = "roberta-base"  # HF hub id or local model directory
    max_len: int = 128  # tokens kept per text (longer texts are truncated)
    pooling: Pooling = "mean"  # how the pooled text feature is made
    pool_layers: int = 1  # the pooled text feature averaged over the last K layers (1: the last only)
    image_model: str = "resnet50"  # torchvision name or timm:NAME
    image_weights: str | None = None  # local state dict instead of downloaded weights
    on_bad_image: OnBadImage = "blank"  # blank: a mean-colour image and a flag; skip: leave the item out
    on_duplicate: OnDuplicate = "first-if-same"  # a guid listed twice; first-if-same: conflicting labels stop
    val_ratio: float = 0.2  # stratified share of labelled items held out for validation
    split_seed: int = 42  # seed of the stratified train/val split
    device: Device = "auto"  # auto: cuda when there is one
    precision: Precision = "auto"  # auto: on CPU the fastest of fp32/bf16 (and compile) measured here; CUDA: bf16/fp16
    compile: bool = False  # always torch.compile the image encoder (else: from 1,000 images on CPU, if measured faster)
    batch_size: int = 32  # items per encoder batch
    limit: int | None = None  # only the first N listed items: a quick trial
    shard: str | None = None  # "i/n": encode the i-th of n disjoint shares (0-based); join with `msa cache merge`
    modalities: tuple[str, ...] = ("text", "image")  # which feature sets to build
    text_source: TextSource = "raw"  # raw+caption: post text <sep> caption (captions from `msa caption`)
    captions: str | None = None  # caption set for caption sources; default: the one set in the cache
    text_split_layer: LayerCount | None = None  # also cache the input of the top K text layers (all: the embeddings)
    image_split_stage: LayerCount | None = None  # also cache the activation entering the last K image stages (or all)


TEXT_SOURCES = get_args(TextSource)


@dataclasses.dataclass
class CaptionConfig:
    data: Path  # MVSA folder, as for extract
    cache: Path = Path("msa-cache")  # captions go to CACHE/captions/, beside the feature sets
    backend: Backend = "transformers"  # lavis runs in its own Python environment (see README)
    model: str = "Salesforce/blip-image-captioning-base"  # HF id or local dir; lavis: base_coco | large_coco
    batch_size: int = 16  # images per generate call
    num_beams: int = 1  # 1: greedy; more: beam search
    max_new_tokens: int = 20  # the longest caption, in tokens
    prompt: str | None = None  # e.g. "a picture of": conditions the caption, stripped from the stored text
    device: Device = "auto"  # auto: cuda when there is one
    precision: Precision = "auto"  # auto: on CPU BLIP's weights in the faster of fp32/bf16 measured here; CUDA: fp16
    compile: bool | None = None  # torch.compile the vision encoder; None: when 200+ images are pending on CPU
    lavis_python: str | None = None  # the interpreter of the environment lavis is installed in
    limit: int | None = None  # only the first N listed items


def to_json(config: Any) -> dict:
    """A config as plain JSON values (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


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
class TrainHeadConfig:
    cache: Path = Path("msa-cache")  # a cache written by `msa extract`
    fusion: str = "concat"  # the fusion head, a name from msa.models.heads.HEADS
    features: tuple[str, ...] = ()  # feature set names, picking a set where a modality has several
    out: Path | None = None  # run directory (must be new); default runs/<fusion>-seed<seed>-<time>
    epochs: int = 20  # the most epochs (early stopping may end sooner)
    batch_size: int | None = None  # default: the head's own (128 pooled, 64 token-level, 32 sequence)
    lr: float = 1e-3  # learning rate (when nothing is unfrozen)
    weight_decay: float = 0.01  # AdamW's
    warmup_ratio: float = 0.1  # share of steps with a linear warm-up, then cosine decay
    dropout: float = 0.1  # dropout in the head
    hidden: int = 256  # width of the head
    seed: int = 0  # seeds the initialisation and the batch order
    task: Task = "auto"  # auto: regression where items carry float scores; classification-2/-7: classes of scores
    modalities: tuple[str, ...] = ()  # a subset of the cache's modalities; default: every modality it holds
    sequence_encoder: SequenceEncoder = "lstm"  # per-modality encoder of the sequence heads
    output_scaling: OutputScaling = "tanh"  # how a regression output is bounded to [-3, 3]
    loss: Loss | None = None  # default ce (classification), l1 (regression)
    class_weights: tuple[float, ...] | None = None  # weighted-ce/focal, in class order; default: inverse frequency
    label_smoothing: float = 0.0  # of the cross-entropy targets
    focal_gamma: float = 2.0  # the focal loss's exponent
    rdrop_alpha: float = 0.0  # R-Drop: weight of the KL between two dropout passes (0: off)
    modality_dropout: float = 0.0  # per-sample probability of zeroing one modality in training
    aux_weight: float = 0.1  # weight of a head's auxiliary loss (the aligned head's contrastive term)
    select: Select | None = None  # the val metric that picks the epoch; default macro_f1 (regression: mae)
    patience: int = 5  # epochs without improvement before stopping
    precision: Precision = "auto"  # auto: bf16 autocast where a few timed training steps say it is faster
    # Unfrozen encoder tops, run on the split activations cached by extract (0: features only).
    unfreeze_text_layers: LayerCount = 0  # train the top K text layers, or all (needs extract --text-split-layer K)
    unfreeze_image_stages: LayerCount = 0  # train the last K image stages, or all (needs extract --image-split-stage K)
    lr_encoder: float = 1e-5  # learning rate of unfrozen encoder layers (the top one, with --layer-decay)
    layer_decay: float = 1.0  # each text layer below the top learns at this times the rate of the one above
    lr_fusion: float = 5e-5  # of the head's fusion layers, when something is unfrozen
    lr_head: float = 1e-4  # of the classifier, when something is unfrozen
    grad_accum: int = 1  # batches per optimizer step
    grad_clip: float = 0.0  # max gradient norm (0: off)
    device: Device = "auto"  # auto: cuda when there is one
    folds: int = 0  # K >= 2: K-fold cross-validation over every labelled item (0: the extract's val split)
    refit: bool = False  # then train again on train+val for the selected epochs, into RUN/refit (what predict uses)


def _shared(config_class: type, field: str) -> Any:
    """A default FinetuneConfig shares with another stage's config (stated once, there)."""
    return dataclasses.field(default=default(config_class, field))


@dataclasses.dataclass
class FinetuneConfig:
    data: Path  # MVSA folder
    out: Path | None = None  # run directory; default runs/finetune-<fusion>-seed<seed>-<time>
    text_model: str = _shared(ExtractConfig, "text_model")  # HF hub id or local model directory
    max_len: int = _shared(ExtractConfig, "max_len")  # tokens kept per text
    pooling: Pooling = _shared(ExtractConfig, "pooling")  # how the pooled text feature is made
    image_model: str = _shared(ExtractConfig, "image_model")  # torchvision name or timm:NAME
    image_weights: str | None = None  # local state dict instead of downloaded weights
    fusion: str = _shared(TrainHeadConfig, "fusion")  # the fusion head, a name from msa.models.heads.HEADS
    hidden: int = _shared(TrainHeadConfig, "hidden")  # width of the head
    dropout: float = _shared(TrainHeadConfig, "dropout")  # dropout in the head
    unfreeze_text_layers: LayerCount = 2  # top transformer layers trained, or all (the embeddings stay frozen)
    lora_rank: int = 0  # LoRA adapters of this rank in every text layer (0: none), trained at --lr-encoder
    lora_targets: tuple[str, ...] = ()  # the linear layers adapted; default: the attention projections
    unfreeze_image_stages: LayerCount = 1  # last stages trained, or all (ResNet: layer4)
    lr_encoder: float = _shared(TrainHeadConfig, "lr_encoder")  # learning rate of the unfrozen encoder layers
    layer_decay: float = _shared(TrainHeadConfig, "layer_decay")  # a text layer learns at this times the rate above it
    lr_fusion: float = _shared(TrainHeadConfig, "lr_fusion")  # of the head's fusion layers
    lr_head: float = _shared(TrainHeadConfig, "lr_head")  # of the classifier
    weight_decay: float = _shared(TrainHeadConfig, "weight_decay")  # AdamW's
    warmup_ratio: float = _shared(TrainHeadConfig, "warmup_ratio")  # share of steps warming up, then cosine decay
    epochs: int = 5  # an epoch end to end costs what a whole cached run does
    batch_size: int = 16  # items per step (times --grad-accum)
    grad_accum: int = _shared(TrainHeadConfig, "grad_accum")  # batches per optimizer step
    grad_clip: float = 1.0  # max gradient norm (0: off)
    loss: Loss | None = None  # ce | weighted-ce | focal (default ce)
    class_weights: tuple[float, ...] | None = None  # weighted-ce/focal, in class order; default: inverse frequency
    label_smoothing: float = _shared(TrainHeadConfig, "label_smoothing")  # of the cross-entropy targets
    focal_gamma: float = _shared(TrainHeadConfig, "focal_gamma")  # the focal loss's exponent
    rdrop_alpha: float = _shared(TrainHeadConfig, "rdrop_alpha")  # R-Drop: weight of the KL between two passes
    select: Select | None = None  # the val metric that picks the epoch: macro_f1 | accuracy | loss (default macro_f1)
    patience: int = 3  # epochs without improvement before stopping
    seed: int = _shared(TrainHeadConfig, "seed")  # seeds the initialisation, the batch order and augmentation
    image_aug: ImageAug = "none"  # weak: crop, flip, colour jitter; strong: weak + RandAugment
    clean_text: bool = False  # drop URLs and @mentions, unwrap #tags, collapse whitespace
    val_ratio: float = _shared(ExtractConfig, "val_ratio")  # the split `msa extract` makes with this ratio and seed
    split_seed: int = _shared(ExtractConfig, "split_seed")  # seed of the stratified train/val split
    on_bad_image: OnBadImage = _shared(ExtractConfig, "on_bad_image")  # blank | skip | fail
    on_duplicate: OnDuplicate = _shared(ExtractConfig, "on_duplicate")  # a guid listed twice
    limit: int | None = None  # only the first N listed items: a quick trial
    device: Device = _shared(ExtractConfig, "device")  # auto: cuda when there is one
    precision: Precision = _shared(ExtractConfig, "precision")  # AMP; auto: CUDA bf16/fp16, CPU the faster measured


@dataclasses.dataclass
class SweepConfig:
    base: TrainHeadConfig  # every run starts from this config
    out: Path = Path("runs/sweep")  # one sub-directory per run, results.csv/parquet here; a sweep's resumes
    fusions: tuple[str, ...] = ("concat",)  # heads, comma-separated
    seeds: tuple[int, ...] = (0, 1, 2)  # seeds, comma-separated
    grid: dict[str, tuple] = dataclasses.field(default_factory=dict)  # TrainHeadConfig field -> values
    workers: int = 1  # processes sharing the CPU threads (2 cores: 12 pooled-head runs 30.8 s -> 26.8 s)
    backend: SweepBackend = "local"  # local: worker processes here; ray: tasks on a Ray cluster (msa[ray])
    address: str | None = None  # the Ray cluster's address (auto, ray://HOST:10001); default: start one here


SPLITS = get_args(Split)


@dataclasses.dataclass
class PredictConfig:
    run: Path  # a run directory from train-head or finetune
    data: Path | None = None  # raw MVSA data; default: the data the run was trained on
    split: Split = "test"  # which items to predict
    out: Path | None = None  # default RUN/predictions-<split>.txt; new data: RUN/predictions-<data>-<id>-<split>.txt
    cache: Path | None = None  # default: the run's cache for its own data, RUN/predict-cache otherwise
    device: Device = "auto"  # auto: cuda when there is one
    probs: bool = False  # write guid,tag,p_negative,p_neutral,p_positive (regression: guid,score)
    ensemble: tuple[Path, ...] = ()  # more runs whose probabilities (or scores) are averaged with --run's


@dataclasses.dataclass
class EvaluateConfig:
    run: Path  # the run to evaluate
    data: Path | None = None  # new MVSA data to score (extracted as predict does); default: the run's own
    labels: Path | None = None  # a guid,tag file; default: the run's val predictions, or --data's labelled items
    text_run: Path | None = None  # a text-only run, for the agreement analysis
    image_run: Path | None = None  # an image-only run, for the agreement analysis
    out: Path | None = None  # default: RUN/evaluation
