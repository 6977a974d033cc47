"""Text: a Hugging Face encoder (or a run's adapted one) on the post, its caption or both."""

from __future__ import annotations

import numpy as np
import torch

from msa.cache.captions import CaptionSet
from msa.core.compute import Compute, WriteBehind, encoding_streams, in_cpu_streams, prefetch
from msa.core.config import ConfigError, ExtractConfig
from msa.core.fingerprint import model_reference
from msa.data.normalise import normalise
from msa.models.build import is_run_dir, text_encoder_of_run
from msa.models.modalities import EncodeJob, Modality, pooled_in_streams
from msa.models.text import TextEncoder, model_identity

WRITE_WINDOW = 512  # rows buffered per write: ~100 MB of float16 tokens at max_len 128


class TextModality(Modality):
    name = "text"
    tuned = True

    def model_name(self, cfg: ExtractConfig) -> str:
        return cfg.text_model

    def fingerprint(self, cfg: ExtractConfig, captions: CaptionSet | None) -> dict:
        text = {"model": model_reference(cfg.text_model), "weights": model_identity(cfg.text_model),
                "max_len": cfg.max_len, "pooling": cfg.pooling, "pool_layers": cfg.pool_layers,
                "text_source": cfg.text_source, "split_layer": cfg.text_split_layer,
                # a key only where it is on: sets extracted before it existed keep their names
                **({"text_normalise": cfg.text_normalise} if cfg.text_normalise != "none" else {})}
        return {**text, "captions": captions.fingerprint} if captions else text

    def load(self, cfg: ExtractConfig) -> TextEncoder:
        if cfg.pool_layers > 1 and cfg.text_split_layer:
            raise ConfigError("--pool-layers and --text-split-layer do not combine: an unfrozen top pools its "
                              "last layer only")
        if is_run_dir(cfg.text_model):  # a fine-tuned encoder, from `msa finetune` or train-head's adapters
            if cfg.text_split_layer or cfg.pool_layers > 1:
                raise ConfigError("--text-model RUN: extract its final features (no --text-split-layer, "
                                  "--pool-layers)")
            return text_encoder_of_run(cfg.text_model)
        return TextEncoder(cfg.text_model, cfg.max_len, cfg.pooling, cfg.pool_layers)

    def autotune_key(self, cfg: ExtractConfig) -> str:
        return f"text|{model_identity(cfg.text_model)}|max_len={cfg.max_len}"

    def sample_inputs(self, encoder: TextEncoder, manifest, rows: np.ndarray):
        texts = manifest.column("text")
        return encoder.collate(encoder.tokenize([texts[r] for r in rows]))

    def timed_forward(self, encoder: TextEncoder, variant, compute: Compute, streams: int):
        return pooled_in_streams(encoder.to(compute.device), variant.precision, compute, streams)

    def encode(self, encoder: TextEncoder, job: EncodeJob) -> None:
        cfg, rows = job.cfg, job.rows
        encoder.to(job.compute.device)
        texts, guids = job.manifest.column("text"), job.manifest.guids
        posts = normalise([texts[r] for r in rows], cfg.text_normalise)
        caption_texts = job.captions.texts([guids[r] for r in rows]) if job.captions else None

        def tokenized(window: np.ndarray) -> list[list[int]]:
            pairs = [caption_texts[i] for i in window] if caption_texts is not None else None
            if cfg.text_source == "caption":
                return encoder.tokenize(pairs)
            # raw+caption: a text pair, the tokenizer puts its own separator between them
            return encoder.tokenize([posts[i] for i in window], pairs if cfg.text_source == "raw+caption" else None)

        if pipelined(job.compute):
            return encode_pipelined(encoder, job, tokenized)
        token_ids = tokenized(np.arange(len(rows)))

        def encode_batch(ids: list[list[int]]) -> tuple:
            return encode_text_batch(encoder, ids, job.compute, cfg.text_split_layer)

        # Length-sorted within windows of rows, each window written at once: one batch's rows lie
        # scattered over the set, and writing them batch by batch took a quarter of the run. No rows,
        # no window (a run stopped between its last write and publishing leaves none pending).
        every_row = np.arange(len(rows))
        windows = [every_row[i: i + WRITE_WINDOW] for i in range(0, len(rows), WRITE_WINDOW)]
        with job.progress("text") as advance:
            for window in windows:
                batches = encoder.length_sorted_batches([token_ids[i] for i in window], cfg.batch_size)
                batch_ids = [[token_ids[i] for i in window[batch]] for batch in batches]
                outputs = []
                for ids, output in zip(batch_ids, in_cpu_streams(encode_batch, batch_ids,
                                                                 encoding_streams(job.compute))):
                    outputs.append(output)
                    advance(len(ids))
                pooled, tokens, mask, split = (None if outputs[0][part] is None else np.concatenate(
                    [output[part] for output in outputs]) for part in range(4))
                job.writer.write(rows[window[np.concatenate(batches)]], pooled, tokens, mask, split)
                job.done("text", len(window))


def pipelined(compute: Compute) -> bool:
    """On a GPU the forward pass outruns the CPU's share of the work: there, tokenising runs a
    window ahead and writing a window behind, on threads of their own."""
    return compute.device.type == "cuda"


# On the device a batch holds as many texts as fit batch_size x max_len tokens, at most this
# many times batch_size: short posts (MVSA's average 30 tokens) fill a GPU the way long ones do.
MOST_TEXTS_PER_BATCH = 8


def token_budget_batches(ids: list[list[int]], max_tokens: int, most: int) -> list[np.ndarray]:
    """Indices into ids, longest first, each batch as many texts as fit `max_tokens` padded to
    its longest (at least one, at most `most`)."""
    order = np.argsort([-len(x) for x in ids], kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, min(most, max_tokens // max(1, len(ids[order[start]]))))
        batches.append(order[start: start + size])
        start += size
    return batches


def encode_pipelined(encoder: TextEncoder, job: EncodeJob, tokenized) -> None:
    """The device's path: each window of rows tokenised and batched by token budget on a thread
    ahead, encoded here, and written by a thread behind (rows in their batches' order)."""
    cfg, rows = job.cfg, job.rows
    every_row = np.arange(len(rows))
    windows = [every_row[i: i + WRITE_WINDOW] for i in range(0, len(rows), WRITE_WINDOW)]

    def prepare(window: np.ndarray) -> tuple[np.ndarray, list[list[list[int]]]]:
        ids = tokenized(window)
        batches = token_budget_batches(ids, cfg.batch_size * cfg.max_len, MOST_TEXTS_PER_BATCH * cfg.batch_size)
        return window[np.concatenate(batches)], [[ids[i] for i in batch] for batch in batches]

    def write(window_rows: np.ndarray, outputs: list[tuple]) -> None:
        pooled, tokens, mask, split = (None if outputs[0][part] is None else np.concatenate(
            [output[part] for output in outputs]) for part in range(4))
        job.writer.write(rows[window_rows], pooled, tokens, mask, split)
        job.done("text", len(window_rows))

    with job.progress("text") as advance, WriteBehind(write) as writer:
        for window_rows, batch_ids in prefetch(windows, prepare):
            outputs = []
            for ids in batch_ids:
                outputs.append(encode_text_batch(encoder, ids, job.compute, cfg.text_split_layer))
                advance(len(ids))
            writer.put(window_rows, outputs)


def encode_text_batch(encoder: TextEncoder, ids: list[list[int]], compute: Compute,
                      split_layer: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(pooled, tokens, mask, split) of one batch, tokens padded to max_len for storing."""
    input_ids, attention_mask = encoder.collate(ids)
    with torch.inference_mode(), compute.autocast():
        if split_layer:
            tokens, pooled, split = encoder.forward_with_split(
                input_ids.to(compute.device), attention_mask.to(compute.device), split_layer)
        else:
            tokens, pooled = encoder(input_ids.to(compute.device), attention_mask.to(compute.device))
    length = tokens.shape[1]
    stored_tokens = np.zeros((len(ids), encoder.max_len, encoder.dim), dtype=np.float16)
    # Pad positions hold zeros, not the model's output for pad tokens: what is
    # stored then does not depend on which texts shared a batch.
    padding = (attention_mask == 0).unsqueeze(-1).to(tokens.device)
    stored_tokens[:, :length] = tokens.masked_fill(padding, 0).to(torch.float16).cpu().numpy()
    stored_mask = np.zeros((len(ids), encoder.max_len), dtype=bool)
    stored_mask[:, :length] = attention_mask.numpy().astype(bool)
    stored_split = None
    if split_layer:
        stored_split = np.zeros((len(ids), encoder.max_len, split.shape[-1]), dtype=np.float32)
        stored_split[:, :length] = (split.float() * attention_mask.unsqueeze(-1).to(split.device)).cpu().numpy()
    return pooled.float().cpu().numpy(), stored_tokens, stored_mask, stored_split
