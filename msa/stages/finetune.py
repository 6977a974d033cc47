"""Fallback: end-to-end fine-tuning on raw images and texts, for what a cache cannot serve
(image augmentation, text cleaning variants, everything unfrozen).

The encoders' bottoms stay frozen (and in eval mode, as when features are cached); their
top layers/stages train with the fusion head, at layer-wise learning rates. Every epoch
writes RUN/last.pt with everything needed to continue exactly (`--resume RUN`). The run
directory has train-head's layout, plus the manifest, so predict and evaluate work on it.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msa.cache.fingerprint import local_path
from msa.cache.manifest import Manifest, build_manifest, read_manifest, write_manifest
from msa.models.heads import ModalityDims, create_head
from msa.models.image import ImageEncoder, build_image_encoder
from msa.models.text import TextEncoder, transformer_layers
from msa.models.unfrozen import image_modality, parameter_groups, text_modality
from msa.pipeline import rundir
from msa.pipeline.compute import prefetch, resolve_compute
from msa.pipeline.config import FinetuneConfig, from_record, to_json
from msa.pipeline.metrics import SELECT, SELECT_BY_TASK, classification_metrics
from msa.pipeline.mvsa import LABELS, read_mvsa
from msa.pipeline.progress import ItemProgress
from msa.pipeline.training import (
    class_targets,
    class_weights_from,
    classification_loss,
    shuffled_batches,
    warmup_cosine,
)

LAST = "last.pt"  # the state to resume from, rewritten after every epoch (read with weights_only)
KIND = "finetune"  # config.json's "kind"
IMAGE_AUGS = ("none", "weak", "strong")


def clean_text(text: str) -> str:
    """Drop URLs and @mentions, keep a #tag's word, collapse whitespace."""
    text = re.sub(r"https?://\S+|www\.\S+", " ", text)
    text = re.sub(r"@\w+", " ", text)
    text = re.sub(r"#(\w+)", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def image_augmentation(preset: str, crop: int):
    """A transform of uint8 [3, H, W] tensors, drawing from torch's global RNG (saved with checkpoints)."""
    if preset == "none":
        return None
    from torchvision.transforms import v2

    weak = [v2.RandomResizedCrop(crop, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    return v2.Compose(weak + ([v2.RandAugment()] if preset == "strong" else []))


class EndToEndModel(nn.Module):
    """Text and image encoders with trainable tops, and a fusion head; reads token ids and pixels."""

    def __init__(self, text: TextEncoder, image: ImageEncoder, head: nn.Module, text_layers: int, image_stages: int):
        super().__init__()
        self.encoders = nn.ModuleDict({"text": text, "image": image})
        self.head = head
        self.uses_tokens = head.uses_tokens
        self.encoders.requires_grad_(False)
        layers = transformer_layers(text.model)
        self.trainable = nn.ModuleList(list(layers[len(layers) - text_layers:]) if text_layers else [])
        if image_stages:  # the stages only: a timm pool holds the whole model
            self.trainable.append(image.split(image_stages)[1].trunk)
        self.trainable.requires_grad_(True)

    def train(self, mode: bool = True) -> EndToEndModel:
        """Frozen parts stay in eval mode (no dropout, fixed BatchNorm statistics), as when cached."""
        super().train(mode)
        self.encoders.eval()
        self.trainable.train(mode)
        return self

    def forward(self, inputs: dict) -> dict[str, torch.Tensor]:
        input_ids, mask = inputs["text"]
        text = text_modality(*self.encoders["text"](input_ids, mask), mask)
        return self.head({"text": text, "image": image_modality(*self.encoders["image"](inputs["image"]))})


def build_model(cfg: FinetuneConfig) -> EndToEndModel:
    text = TextEncoder(cfg.text_model, cfg.max_len, cfg.pooling)
    image = build_image_encoder(cfg.image_model, cfg.image_weights)
    dims = {"text": ModalityDims(text.dim, text.dim), "image": ModalityDims(image.dim, image.dim)}
    head = create_head(cfg.fusion, dims, len(LABELS), cfg.hidden, cfg.dropout)
    return EndToEndModel(text, image, head, cfg.unfreeze_text_layers, cfg.unfreeze_image_stages)


@dataclasses.dataclass
class RawData:
    """Items tokenised once; images decoded per batch."""

    manifest: Manifest
    token_ids: list[list[int]]
    image_sources: list[str | None]  # None: a bad image, fed as a blank one
    targets: torch.Tensor  # [N], -1 for unlabelled

    @classmethod
    def read(cls, manifest: Manifest, encoder: TextEncoder, clean: bool) -> RawData:
        texts = [clean_text(t) if clean else t for t in manifest.column("text")]
        return cls(manifest, encoder.tokenize(texts), manifest.image_sources(), class_targets(manifest.column("label")))


def batch_inputs(model: EndToEndModel, data: RawData, rows: torch.Tensor, pixels: torch.Tensor, augment,
                 device: torch.device) -> dict:
    text: TextEncoder = model.encoders["text"]
    input_ids, mask = text.collate([data.token_ids[r] for r in rows.tolist()])
    if augment is not None:  # in this thread, so that its random draws follow the saved RNG state
        pixels = torch.stack([augment(p) for p in pixels])
    images = model.encoders["image"].preprocess.normalise(pixels.to(device))
    images = images.contiguous(memory_format=torch.channels_last)
    return {"text": (input_ids.to(device), mask.to(device)), "image": images}


def load_pixels(model: EndToEndModel, data: RawData, rows: torch.Tensor) -> torch.Tensor:
    preprocess = model.encoders["image"].preprocess
    return torch.from_numpy(np.stack([preprocess.load(data.image_sources[r]) for r in rows.tolist()]))


@torch.no_grad()
def predict_rows(model: EndToEndModel, data: RawData, rows: np.ndarray, compute, batch_size: int,
                 show_progress: bool = False) -> np.ndarray:
    """Class probabilities [N, C] for rows, in their order."""
    model.eval()
    batches = [torch.from_numpy(rows[i: i + batch_size]) for i in range(0, len(rows), batch_size)]
    out = []
    with ItemProgress("predict", len(rows), show_progress) as advance:
        for batch, pixels in zip(batches, prefetch(batches, lambda b: load_pixels(model, data, b))):
            with compute.autocast():
                logits = model(batch_inputs(model, data, batch, pixels, None, compute.device))["logits"]
            out.append(logits.float().softmax(-1).cpu())
            advance(len(batch))
    return torch.cat(out).numpy() if out else np.zeros((0, len(LABELS)))


def rng_state(generator: torch.Generator) -> dict:
    """Every random state, as tensors and plain values (the checkpoint loads with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run(cfg: FinetuneConfig, resume: bool = False, show_progress: bool = True, log=print,
        on_epoch=None, overwrite: bool = False) -> Path:
    """Train end to end into cfg.out; with resume, continue from cfg.out/last.pt. `on_epoch(epoch)`
    follows each saved epoch. Returns the run directory, whose metrics.json is written last."""
    run_dir = Path(cfg.out or Path("runs") / f"finetune-{cfg.fusion}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.select not in SELECT_BY_TASK["classification"]:
        raise ValueError(f"--select must be one of {', '.join(SELECT_BY_TASK['classification'])}")
    if cfg.image_aug not in IMAGE_AUGS:
        raise ValueError(f"--image-aug must be one of {', '.join(IMAGE_AUGS)}, got {cfg.image_aug!r}")
    cfg = dataclasses.replace(cfg, text_model=local_path(cfg.text_model), image_weights=local_path(cfg.image_weights))
    if resume and not (run_dir / LAST).is_file():
        raise rundir.RunDirError(f"--resume {run_dir}: no {LAST} there, so nothing to resume")
    lock = rundir.lock_run(run_dir) if resume else rundir.claim(run_dir, KIND, overwrite)
    try:
        return _train(cfg, run_dir, resume, show_progress, log, on_epoch)
    finally:
        lock.release()


def _train(cfg: FinetuneConfig, run_dir: Path, resume: bool, show_progress: bool, log, on_epoch) -> Path:
    compute = resolve_compute(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg).to(compute.device)
    augment = image_augmentation(cfg.image_aug, model.encoders["image"].preprocess.crop)

    if resume:
        manifest = read_manifest(run_dir)
    else:
        items, _ = read_mvsa(cfg.data, cfg.on_bad_image, cfg.on_duplicate)
        manifest = build_manifest(items[: cfg.limit] if cfg.limit else items, cfg.data, cfg.val_ratio,
                                  cfg.split_seed, cfg.on_bad_image)
        write_manifest(manifest, run_dir)
    rundir.write_json(run_dir / rundir.CONFIG, {**to_json(cfg), "kind": KIND, "out": str(run_dir),
                                                "cache": str(run_dir)})
    data = RawData.read(manifest, model.encoders["text"], cfg.clean_text)
    train_rows, val_rows = manifest.rows_of_split("train"), manifest.rows_of_split("val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"{cfg.data}: need both train and val items (have {len(train_rows)} / {len(val_rows)})")

    weights = None
    if cfg.loss in ("weighted-ce", "focal"):
        weights = (torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights
                   else class_weights_from(data.targets[train_rows].numpy(), len(LABELS)))
    loss_fn = classification_loss(cfg.loss, None if weights is None else weights.to(compute.device),
                                  cfg.label_smoothing, cfg.focal_gamma)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.lr_encoder, cfg.lr_fusion, cfg.lr_head,
                                                   cfg.weight_decay))
    steps_per_epoch = -(-len(train_rows) // (cfg.batch_size * cfg.grad_accum))
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_ratio)
    scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.device.type == "cuda"
                                  and compute.precision == "fp16")
    select_key, larger_is_better = SELECT[cfg.select]
    state = {"epoch": 0, "best_score": None, "best_epoch": 0, "stale": 0, "best_metrics": None}
    if resume:
        last = rundir.load_checkpoint(run_dir / LAST, map_location=compute.device)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        scaler.load_state_dict(last["scaler"])
        set_rng_state(last["rng"], generator)
        state = last["state"]
        _truncate_history(run_dir, state["epoch"])
        log(f"resuming {run_dir} after epoch {state['epoch']}")

    lengths = torch.tensor([len(ids) for ids in data.token_ids])
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stale"] >= cfg.patience:
            break
        epoch_start = time.perf_counter()
        model.train()
        batches = shuffled_batches(train_rows, cfg.batch_size, generator, lengths)
        total_loss = 0.0
        with ItemProgress(f"epoch {epoch}", len(train_rows), show_progress) as advance:
            for index, (batch, pixels) in enumerate(zip(batches, prefetch(batches,
                                                                          lambda b: load_pixels(model, data, b)))):
                inputs = batch_inputs(model, data, batch, pixels, augment, compute.device)
                with compute.autocast():
                    logits = model(inputs)["logits"]
                loss = loss_fn(logits.float(), data.targets[batch].to(compute.device)).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss ({loss.item()}); lower the learning rates")
                scaler.scale(loss / cfg.grad_accum).backward()
                if (index + 1) % cfg.grad_accum == 0 or index + 1 == len(batches):
                    scaler.unscale_(optimizer)
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                 cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                total_loss += loss.item() * len(batch)
                advance(len(batch))

        probabilities = predict_rows(model, data, val_rows, compute, cfg.batch_size * 2)
        val_targets = data.targets[val_rows].numpy()
        metrics = classification_metrics(val_targets, probabilities.argmax(1), list(LABELS))
        metrics["loss"] = float(nn.functional.nll_loss(torch.from_numpy(np.log(probabilities + 1e-12)),
                                                       torch.from_numpy(val_targets)))
        rundir.append_history(run_dir, {
            "epoch": epoch, "train_loss": round(total_loss / len(train_rows), 5), "aux_loss": 0.0,
            "val_loss": round(metrics["loss"], 5), "val_accuracy": round(metrics["accuracy"], 5),
            "val_macro_f1": round(metrics["macro_f1"], 5), "lr": scheduler.get_last_lr()[-1],
            "seconds": round(time.perf_counter() - epoch_start, 3)})
        score = metrics[select_key] if larger_is_better else -metrics[select_key]
        state["epoch"] = epoch
        if state["best_score"] is None or score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch, stale=0, best_metrics={**metrics, "best_epoch": epoch})
            _save_best(run_dir, model, cfg, manifest, val_rows, probabilities)
        else:
            state["stale"] += 1
            if state["stale"] >= cfg.patience:
                log(f"early stop at epoch {epoch}: no better val {cfg.select} for {cfg.patience} epochs")
        rundir.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                      "rng": rng_state(generator), "state": state}, run_dir / LAST)
        if on_epoch:
            on_epoch(epoch)
    rundir.plot_run(run_dir, state["best_metrics"])
    rundir.write_json(run_dir / rundir.METRICS, state["best_metrics"])  # last: the run is finished
    return run_dir


def _save_best(run_dir: Path, model: EndToEndModel, cfg: FinetuneConfig, manifest: Manifest, val_rows: np.ndarray,
               probabilities: np.ndarray) -> None:
    rundir.save_model(run_dir, model.state_dict(), {"kind": KIND, "config": to_json(cfg), "class_names": list(LABELS)})
    guids, labels = manifest.guids, manifest.column("label")
    rundir.write_predictions(run_dir / rundir.VAL_PREDICTIONS, rundir.predictions_table(
        [guids[r] for r in val_rows], [labels[r] for r in val_rows], probabilities, list(LABELS)))


def _truncate_history(run_dir: Path, epochs: int) -> None:
    """Drop history rows of epochs after the checkpoint (a kill between the two writes)."""
    if not (run_dir / rundir.HISTORY).exists():
        return
    rows = [r for r in rundir.read_history(run_dir) if int(r["epoch"]) <= epochs]
    (run_dir / rundir.HISTORY).unlink()
    for row in rows:
        rundir.append_history(run_dir, row)


def load_finetuned(run_dir: Path, device: str = "auto") -> tuple[EndToEndModel, FinetuneConfig, object]:
    state_dict, spec = rundir.load_model(run_dir)
    cfg = from_record(FinetuneConfig, spec["config"])
    compute = resolve_compute(device, cfg.precision)
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    return model.to(compute.device).eval(), cfg, compute
