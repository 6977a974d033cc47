"""One dataclass config per stage. Defaults live here only; the CLI maps options onto fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An option value that cannot work (a bad choice, a missing split); the message names the option."""


@dataclasses.dataclass
class ExtractConfig:
    data: Path  # MVSA folder: train.txt, test_without_label.txt, data/{guid}.txt|jpg
    cache: Path = Path("msa-cache")  # one cache directory per data set
    text_model: str = "roberta-base"  # HF hub id or local model directory
    max_len: int = 128  # tokens kept per text (longer texts are truncated)
    pooling: str = "mean"  # mean | cls: how the pooled text feature is made
    image_model: str = "resnet50"  # torchvision name or timm:NAME
    image_weights: str | None = None  # local state dict instead of downloaded weights
    on_bad_image: str = "blank"  # blank | skip | fail
    on_duplicate: str = "first-if-same"  # first-if-same (conflicting labels stop) | first | error
    val_ratio: float = 0.2  # stratified share of labelled items held out for validation
    split_seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16/fp16 only where fast)
    compile: bool = False  # torch.compile the image encoder (pays off on large data sets)
    batch_size: int = 32
    limit: int | None = None  # only the first N listed items: a quick trial
    shard: str | None = None  # "i/n": encode the i-th of n disjoint shares (0-based)
    modalities: tuple[str, ...] = ("text", "image")
    text_source: str = "raw"  # raw | caption | raw+caption (post text <sep> caption, the tokenizer's separator)
    captions: str | None = None  # caption set for caption sources; default: the one set in the cache
    text_split_layer: int | None = None  # also cache the hidden states entering the top K text layers
    image_split_stage: int | None = None  # also cache the activation entering the last K image stages


TEXT_SOURCES = ("raw", "caption", "raw+caption")


@dataclasses.dataclass
class CaptionConfig:
    data: Path  # MVSA folder, as for extract
    cache: Path = Path("msa-cache")  # captions go to CACHE/captions/, beside the feature sets
    backend: str = "transformers"  # transformers | lavis (its own Python environment, see README)
    model: str = "Salesforce/blip-image-captioning-base"  # HF id or local dir; lavis: base_coco | large_coco
    batch_size: int = 16
    num_beams: int = 1  # 1: greedy
    max_new_tokens: int = 20
    prompt: str | None = None  # e.g. "a picture of": conditions the caption, stripped from the stored text
    device: str = "auto"
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPUs without fast bf16
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
    fusion: str = "concat"  # a name from msa.models.heads.HEADS
    features: tuple[str, ...] = ()  # feature set names, text role first; empty: the one set per modality
    out: Path | None = None  # run directory; default runs/<fusion>-seed<seed>-<time>
    epochs: int = 20
    batch_size: int | None = None  # None: the head's own default_batch_size (128 pooled, 64 token-level)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of steps with a linear warm-up, then cosine decay
    dropout: float = 0.1
    hidden: int = 256
    seed: int = 0
    task: str = "auto"  # auto | classification | regression (auto: regression for float scores)
    modalities: tuple[str, ...] = ()  # a subset of the cache's modalities (text,audio,vision); empty: all
    sequence_encoder: str = "lstm"  # lstm | transformer: per-modality encoder of the sequence heads
    output_scaling: str = "tanh"  # tanh | sigmoid: how a regression output is bounded to [-3, 3]
    loss: str | None = None  # ce | weighted-ce | focal; regression: mse | l1 | huber. None: ce / l1
    class_weights: tuple[float, ...] | None = None  # weighted-ce/focal; default: inverse train frequency
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    rdrop_alpha: float = 0.0  # R-Drop: weight of the KL between two dropout passes (0: off)
    modality_dropout: float = 0.0  # per-sample probability of zeroing one modality in training
    aux_weight: float = 0.1  # weight of a head's auxiliary loss (the aligned head's contrastive term)
    select: str | None = None  # macro_f1 | accuracy | loss; regression: mae | corr | loss. None: macro_f1 / mae
    patience: int = 5  # epochs without improvement before stopping
    # Unfrozen encoder tops, run on the split activations cached by extract (0: features only).
    unfreeze_text_layers: int = 0  # needs a text set extracted with --text-split-layer of the same K
    unfreeze_image_stages: int = 0  # needs an image set extracted with --image-split-stage of the same K
    lr_encoder: float = 1e-5  # layer-wise rates when something is unfrozen; lr applies otherwise
    lr_fusion: float = 5e-5
    lr_head: float = 1e-4
    grad_accum: int = 1  # batches per optimizer step
    grad_clip: float = 0.0  # max gradient norm (0: off)
    device: str = "auto"  # auto | cpu | cuda


def _shared(config_class: type, field: str) -> Any:
    """A default FinetuneConfig shares with another stage's config (stated once, there)."""
    return dataclasses.field(default=default(config_class, field))


@dataclasses.dataclass
class FinetuneConfig:
    data: Path  # MVSA folder
    out: Path | None = None  # run directory; default runs/finetune-<fusion>-seed<seed>-<time>
    text_model: str = _shared(ExtractConfig, "text_model")
    max_len: int = _shared(ExtractConfig, "max_len")
    pooling: str = _shared(ExtractConfig, "pooling")
    image_model: str = _shared(ExtractConfig, "image_model")
    image_weights: str | None = None
    fusion: str = _shared(TrainHeadConfig, "fusion")
    hidden: int = _shared(TrainHeadConfig, "hidden")
    dropout: float = _shared(TrainHeadConfig, "dropout")
    unfreeze_text_layers: int = 2  # top transformer layers trained (the rest stays frozen)
    unfreeze_image_stages: int = 1  # last stages trained (ResNet: layer4)
    lr_encoder: float = _shared(TrainHeadConfig, "lr_encoder")
    lr_fusion: float = _shared(TrainHeadConfig, "lr_fusion")
    lr_head: float = _shared(TrainHeadConfig, "lr_head")
    weight_decay: float = _shared(TrainHeadConfig, "weight_decay")
    warmup_ratio: float = _shared(TrainHeadConfig, "warmup_ratio")
    epochs: int = 5  # an epoch end to end costs what a whole cached run does
    batch_size: int = 16
    grad_accum: int = _shared(TrainHeadConfig, "grad_accum")
    grad_clip: float = 1.0  # max gradient norm (0: off)
    loss: str | None = None  # ce | weighted-ce | focal (None: ce)
    class_weights: tuple[float, ...] | None = None
    label_smoothing: float = _shared(TrainHeadConfig, "label_smoothing")
    focal_gamma: float = _shared(TrainHeadConfig, "focal_gamma")
    select: str | None = None  # macro_f1 | accuracy | loss (None: macro_f1)
    patience: int = 3
    seed: int = _shared(TrainHeadConfig, "seed")
    image_aug: str = "none"  # none | weak (crop, flip, colour jitter) | strong (weak + RandAugment)
    clean_text: bool = False  # drop URLs and @mentions, unwrap #tags, collapse whitespace
    val_ratio: float = _shared(ExtractConfig, "val_ratio")  # the split `msa extract` makes with this ratio and seed
    split_seed: int = _shared(ExtractConfig, "split_seed")
    on_bad_image: str = _shared(ExtractConfig, "on_bad_image")
    on_duplicate: str = _shared(ExtractConfig, "on_duplicate")
    limit: int | None = None
    device: str = _shared(ExtractConfig, "device")
    precision: str = _shared(ExtractConfig, "precision")  # AMP: fp16/bf16 autocast on CUDA, bf16 on bf16 CPUs


@dataclasses.dataclass
class SweepConfig:
    base: TrainHeadConfig  # every run starts from this config
    out: Path = Path("runs/sweep")  # one sub-directory per run, results.csv/parquet here
    fusions: tuple[str, ...] = ("concat",)
    seeds: tuple[int, ...] = (0, 1, 2)
    grid: dict[str, tuple] = dataclasses.field(default_factory=dict)  # TrainHeadConfig field -> values
    workers: int = 1  # processes sharing the CPU threads (2 cores: 12 pooled-head runs 30.8 s -> 26.8 s)


SPLITS = ("test", "val", "train", "all")


@dataclasses.dataclass
class PredictConfig:
    run: Path  # a run directory from train-head or finetune
    data: Path | None = None  # raw MVSA data; default: the data the run was trained on
    split: str = "test"  # test | val | train | all
    out: Path | None = None  # default: RUN/predictions-<split>.txt
    cache: Path | None = None  # default: the run's cache for its own data, RUN/predict-cache otherwise
    device: str = "auto"


@dataclasses.dataclass
class EvaluateConfig:
    run: Path  # the run to evaluate
    labels: Path | None = None  # a guid,tag file; default: the run's validation predictions
    text_run: Path | None = None  # a text-only run, for the agreement analysis
    image_run: Path | None = None  # an image-only run, for the agreement analysis
    out: Path | None = None  # default: RUN/evaluation
