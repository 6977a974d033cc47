"""Text encoders: any Hugging Face AutoModel, by hub id or local directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch import nn

from msa.core.config import ConfigError, Pooling, resolve_layer_count
from msa.core.fingerprint import file_digest, files_digest

POOLINGS = get_args(Pooling)


class EncoderLoadError(RuntimeError):
    """An encoder could not be built; the message says what to pass instead."""


def model_identity(name: str) -> str:
    """What pins a model's weights: a content digest for local paths, the revision for hub ids."""
    path = Path(name)
    if path.is_file():
        return file_digest(path)
    if (path / "model.json").is_file() and (path / "model.safetensors").is_file():  # an msa run: its model only
        return files_digest([path / "model.json", path / "model.safetensors"])
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return files_digest(files)
    try:  # a hub id already downloaded: the snapshot directory is named by its commit
        from transformers.utils import cached_file

        config = cached_file(name, "config.json")
        return f"revision:{Path(config).parent.name}"
    except Exception:  # not cached or not a hub model; the load itself will say which
        return "revision:unknown"


# Keys by which a model directory asks transformers to import Python files it carries.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def refuse_remote_code(model_dir: str) -> None:
    """A local model directory whose configs ask to run its own code is refused before
    transformers sees it (which would ask on stdin, and run it on a `y`)."""
    directory = Path(model_dir)
    if not directory.is_dir():
        return
    for config in sorted(directory.glob("*.json")):
        try:
            record = json.loads(config.read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            continue  # not JSON: transformers says so when it reads it
        asks = [key for key in REMOTE_CODE_KEYS if isinstance(record, dict) and key in record]
        if asks:
            raise EncoderLoadError(f"{config}: the model directory asks to run its own code ({asks[0]}); msa never "
                                   "runs code from a model directory: use a model transformers knows natively")


class TextEncoder(nn.Module):
    """Tokenises and encodes texts into token features `[B, L, D]` and a pooled `[B, D]`."""

    def __init__(self, model_name: str, max_len: int = 128, pooling: str = "mean", pool_layers: int = 1):
        """pool_layers K: the pooled feature is the mean of the last K layers' pooled outputs
        (lower layers keep more of the surface wording that sentiment hangs on)."""
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # msa shows its own progress; one bar per load is noise
        refuse_remote_code(model_name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(model_name, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise EncoderLoadError(
                f"could not load text model {model_name!r} ({err}). Without access to the "
                "model hub, pass a local Hugging Face model directory to --text-model."
            ) from err
        self.model.eval()
        self.max_len = max_len
        self.pooling = pooling
        self.pool_layers = pool_layers
        layers = len(transformer_layers(self.model))
        if not 1 <= pool_layers <= layers:
            raise ConfigError(f"--pool-layers must be between 1 and {layers} for this model, got {pool_layers}")
        self.dim = self.model.config.hidden_size

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
        """Token ids per text (special tokens included, truncated to max_len), unpadded."""
        if not texts:  # the fast tokenizers fail on an empty batch
            return []
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_len,
                                 padding=False, return_attention_mask=False)
        return encoded["input_ids"]

    @staticmethod
    def length_sorted_batches(ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        """Indices into ids, batched longest first: similar lengths share a batch (little
        padding; 3.8x faster than padding to max_len for MPNet here), and the slowest batches
        come first, so memory peaks and the ETA is pessimistic at the start."""
        order = np.argsort([-len(x) for x in ids], kind="stable")
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]

    def collate(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad a batch to its own longest text: (input_ids, attention_mask), both [B, L]."""
        length = max(len(x) for x in ids)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, token_ids in enumerate(ids):
            input_ids[row, : len(token_ids)] = torch.tensor(token_ids)
            attention_mask[row, : len(token_ids)] = 1
        return input_ids, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool_layers == 1:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
            return hidden, pool_tokens(hidden, attention_mask, self.pooling)
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        pooled = torch.stack([pool_tokens(h, attention_mask, self.pooling) for h in states[-self.pool_layers:]])
        return states[-1], pooled.mean(0)  # tokens: the last layer's [B, L, D]; pooled [B, D]

    def forward_with_split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           split_layer: int | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward(), plus the hidden states entering the top `split_layer` layers (or "all") ([B, L, D])."""
        layers = len(transformer_layers(self.model))
        split_layer = resolve_layer_count(split_layer, layers, "--text-split-layer")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # hidden_states[0] is the embeddings' output, [i] the output of layer i.
        split = out.hidden_states[layers - split_layer]
        hidden = out.last_hidden_state
        return hidden, pool_tokens(hidden, attention_mask, self.pooling), split

    def top(self, layers: int | str) -> TextTop:
        """The top `layers` transformer layers (or "all") as a module of their own (weights copied)."""
        return TextTop(self.model, layers, self.pooling)


# Linear layers LoRA adapts by default: the attention projections of BERT/RoBERTa (query, key,
# value) and MPNet (q, k, v, o), matched by the last part of their names.
LORA_TARGETS = ("query", "key", "value", "q", "k", "v", "o")


def add_lora(layers: list[nn.Module], rank: int, targets: tuple[str, ...] = ()) -> None:
    """Put LoRA adapters (peft) of rank `rank` into the linear layers named `targets` (default:
    the attention projections) of these transformer layers, in place. The base weights stay as
    they are; only the adapters are new parameters, kept in the model's state dict, so a run's
    weights file carries them. The same call serves the top layers of a whole encoder (end to
    end) and the copies of them that run on cached activations (train-head)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for layer in layers for name, module in layer.named_modules()
             if isinstance(module, nn.Linear)}
    chosen = [t for t in (targets or LORA_TARGETS) if t in names]
    if not chosen:
        raise ConfigError(f"--lora-targets {','.join(targets or LORA_TARGETS)}: no such linear layer in the text model "
                          f"(it has {', '.join(sorted(names))})")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=chosen)
    for layer in layers:
        inject_adapter_in_model(config, layer)


def top_layers(model: nn.Module, count: int | str) -> list[nn.Module]:
    """The top `count` transformer layers of a whole encoder model (or all)."""
    stack = transformer_layers(model)
    count = resolve_layer_count(count, len(stack), "--unfreeze-text-layers")
    return list(stack)[len(stack) - count:]


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers: the ModuleList as long as its layer count
    (encoder.layer in BERT, RoBERTa and MPNet, transformer.layer in DistilBERT)."""
    count = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise EncoderLoadError(f"{type(model).__name__}: cannot find its {count} transformer layers")


class _PassEmbeddings(nn.Module):
    """Stands in for the embeddings: the cached hidden states come in as inputs_embeds."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        return inputs_embeds


class TextTop(nn.Module):
    """The top K layers of a text encoder, run on the cached hidden states entering them.

    It is a copy of the whole model with the embeddings passing their input through and
    only the top layers left, so the model's own code builds the attention mask (and
    MPNet's relative position bias) exactly as in the full forward pass."""

    def __init__(self, model: nn.Module, layers: int | str, pooling: str):
        super().__init__()
        self.model = copy.deepcopy(model)
        stack = transformer_layers(self.model)
        layers = resolve_layer_count(layers, len(stack), "--unfreeze-text-layers")
        del stack[: len(stack) - layers]
        self.stack_name = next(name for name, module in self.model.named_modules() if module is stack)
        self.model.embeddings = _PassEmbeddings()
        self.model.pooler = None
        self.pooling = pooling

    def layers(self) -> nn.ModuleList:
        """The layers kept, bottom first."""
        return self.model.get_submodule(self.stack_name)

    def forward(self, split: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(inputs_embeds=split, attention_mask=attention_mask.long()).last_hidden_state
        return hidden, pool_tokens(hidden, attention_mask, self.pooling)
