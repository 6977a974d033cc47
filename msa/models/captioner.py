"""Image captioners, chosen by name from CAPTIONERS: BLIP through transformers, or salesforce-lavis.

A captioner splits its work in two so that image decoding overlaps generation:
`prepare(paths)` runs in a loader thread and returns (batch, ok) where ok[i] says
whether image i could be read; `generate(batch)` returns one caption per readable image.
Captions never include the prompt, whichever backend made them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from msa.core.compute import Compute
from msa.core.config import CaptionConfig, ConfigError
from msa.models.text import EncoderLoadError, model_identity, refuse_remote_code

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_rgb(path: str | None, size: int) -> Image.Image | None:
    """An RGB image, JPEG-decoded at reduced scale where it is still >= size; None if unreadable."""
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class TransformersCaptioner:
    """BlipForConditionalGeneration with its processor, from a hub id or a local directory."""

    def __init__(self, cfg: CaptionConfig, compute: Compute, compile_vision: bool):
        from transformers import AutoProcessor, BlipForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        refuse_remote_code(cfg.model)
        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model, trust_remote_code=False)
            self.model = BlipForConditionalGeneration.from_pretrained(cfg.model, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise EncoderLoadError(f"could not load captioning model {cfg.model!r} ({err}). Without access "
                                   "to the model hub, pass a local BLIP directory to --model.") from err
        self.dtype = DTYPES[compute.precision]
        self.device = compute.device
        self.model.to(self.device, self.dtype).eval()
        self.size = self.processor.image_processor.size["height"]
        self.batch_size = cfg.batch_size
        self.generate_options = {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens,
                                 "do_sample": False}
        # BLIP's generate swaps the first id for its bos token and drops the trailing [SEP]; the
        # output then starts with the prompt tokens, which are cut off before decoding.
        ids = self.processor.tokenizer(cfg.prompt or "", return_tensors="pt")["input_ids"]
        self.prompt_ids = ids if cfg.prompt else None
        self.prompt_length = ids.shape[1] - 1
        self.compiled = compile_vision
        if compile_vision:  # the ViT is ~3/4 of the time; compiled it ran 1.3x faster on this CPU
            self.model.vision_model.compile(dynamic=False)

    def prepare(self, paths: list[str | None]) -> tuple[torch.Tensor | None, list[bool]]:
        images = [load_rgb(p, self.size) for p in paths]
        readable = [im for im in images if im is not None]
        pixels = self.processor.image_processor(readable, return_tensors="pt")["pixel_values"] if readable else None
        return pixels, [im is not None for im in images]

    def generate(self, pixels: torch.Tensor) -> list[str]:
        n = len(pixels)
        if self.compiled and n < self.batch_size:  # a smaller last batch would trigger a second compile
            pixels = torch.cat([pixels, pixels[-1:].expand(self.batch_size - n, -1, -1, -1)])
        prompt = None if self.prompt_ids is None else self.prompt_ids.repeat(len(pixels), 1).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels.to(self.device, self.dtype), input_ids=prompt,
                                      **self.generate_options)
        texts = self.processor.tokenizer.batch_decode(out[:n, self.prompt_length:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def close(self) -> None:
        pass

    @staticmethod
    def identity(cfg: CaptionConfig) -> str:
        return model_identity(cfg.model)


LAVIS_INSTALL = (
    "lavis needs its own Python environment (salesforce-lavis 1.0.2 pins transformers 4.26, msa uses 5.x): "
    'python3.11 -m venv lavis-env && lavis-env/bin/pip install salesforce-lavis "transformers==4.26.1" '
    '"numpy<2" "torch==2.14.1" "torchvision==0.29.1", then pass --lavis-python lavis-env/bin/python'
)
WORKER_TAG = "MSA-LAVIS "  # marks protocol lines: lavis prints its own messages to stdout too


class LavisCaptioner:
    """salesforce-lavis's `blip_caption` (model types base_coco, large_coco), run by lavis_worker.py
    in lavis's environment and driven over JSON lines on its stdin and stdout."""

    def __init__(self, cfg: CaptionConfig, compute: Compute, compile_vision: bool):
        python = cfg.lavis_python or sys.executable
        worker = Path(__file__).with_name("lavis_worker.py")
        job = {"model_type": cfg.model, "num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens,
               "prompt": cfg.prompt, "device": str(compute.device), "fp16": compute.precision == "fp16"}
        try:
            self.process = subprocess.Popen([python, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True, encoding="utf-8", env={**os.environ, "HF_HUB_OFFLINE": "1"})
        except OSError as err:
            raise EncoderLoadError(f"cannot start {python} for the lavis backend ({err}). {LAVIS_INSTALL}") from err
        self.size = 384
        self._send(job)
        reply = self._receive()
        if "error" in reply:
            raise EncoderLoadError(f"lavis backend: {reply['error']}. {LAVIS_INSTALL}")

    def _send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(WORKER_TAG):
                return json.loads(line[len(WORKER_TAG):])
        code = self.process.wait()
        return {"error": f"the lavis worker ended (exit code {code}) without answering; its messages are above"}

    def prepare(self, paths: list[str | None]) -> tuple[list[str], list[bool]]:
        # lavis decodes the files itself; opening them here finds the unreadable ones first.
        ok = [load_rgb(p, self.size) is not None for p in paths]
        return [str(p) for p, good in zip(paths, ok) if good], ok

    def generate(self, paths: list[str]) -> list[str]:
        self._send({"paths": paths})
        reply = self._receive()
        if "error" in reply:
            raise RuntimeError(f"lavis backend: {reply['error']}")
        return reply["captions"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)

    @staticmethod
    def identity(cfg: CaptionConfig) -> str:
        return f"lavis:{cfg.model}"  # lavis fetches its own checkpoint for the model type


CAPTIONERS = {"transformers": TransformersCaptioner, "lavis": LavisCaptioner}


def captioner_class(backend: str) -> type:
    if backend not in CAPTIONERS:
        raise ConfigError(f"unknown caption backend {backend!r}; known: {', '.join(CAPTIONERS)}")
    return CAPTIONERS[backend]


def create_captioner(cfg: CaptionConfig, compute: Compute, compile_vision: bool):
    return captioner_class(cfg.backend)(cfg, compute, compile_vision)


def spread_captions(captions: list[str], ok: list[bool]) -> list[str]:
    """Captions of the readable images spread over the whole batch; "" for the unreadable ones."""
    spread = iter(captions)
    return [next(spread) if good else "" for good in ok]

