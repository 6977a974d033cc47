"""The one place models are built: a run's model spec (its `model.json`) -> the model.

A spec is plain JSON, so a run directory alone rebuilds its model (the weights are in
`model.safetensors` beside it). Two kinds:

    {"kind": "head", "fusion", "hidden", "dropout", "task", "outputs", "sequence_encoder", "output_scaling",
     "dims": {modality: {"pooled", "token"}}, "unfrozen": {modality: K}, "feature_sets": {...},
     "standardised": [modality]}
        a fusion head on cached features, behind the unfrozen encoder tops it trains; the
        features of the modalities in "standardised" standardised before it
    {"kind": "end-to-end", "fusion", "hidden", "dropout", "task", "outputs", "text_model", "max_len",
     "pooling", "image_model", "image_weights", "unfreeze_text_layers", "unfreeze_image_stages"}
        encoders with trainable tops and a fusion head (`msa finetune`)
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from msa.core.config import ConfigError, resolve_layer_count
from msa.core.errors import CacheError
from msa.models.heads import ModalityDims, StandardisedInputs
from msa.models.image import build_image_encoder, trunk_stages
from msa.models.registry import create_head
from msa.models.regression import ScaledScore
from msa.models.text import TextEncoder, add_lora, top_layers, transformer_layers
from msa.models.unfrozen import EndToEndModel, TopsAndHead

SPLIT_OPTIONS = {"text": ("split_layer", "--text-split-layer"), "image": ("split_stage", "--image-split-stage")}


def build_model(spec: dict) -> nn.Module:
    """The model a spec describes, with pretrained (or random-init head) weights."""
    if spec["kind"] == "end-to-end":
        text = TextEncoder(spec["text_model"], spec["max_len"], spec["pooling"])
        text_layers = spec["unfreeze_text_layers"]
        if spec.get("lora_rank"):
            # Adapters in the layers spec["lora_layers"] names, which then train through them alone
            # (runs of msa < 0.3 carry no lora_layers: adapters in every layer, the top ones unfrozen too).
            adapted = spec.get("lora_layers", "all")
            add_lora(top_layers(text.model, adapted), spec["lora_rank"], tuple(spec.get("lora_targets") or ()))
            text_layers = 0 if "lora_layers" in spec else text_layers
        image = build_image_encoder(spec["image_model"], spec["image_weights"])
        dims = {"text": ModalityDims(text.dim, text.dim), "image": ModalityDims(image.dim, image.dim)}
        head = create_head(spec["fusion"], dims, spec["outputs"], spec["hidden"], spec["dropout"])
        return EndToEndModel(text, image, head, text_layers, spec["unfreeze_image_stages"])
    dims = {m: ModalityDims(**d) for m, d in spec["dims"].items()}
    model = create_head(spec["fusion"], dims, spec["outputs"], spec["hidden"], spec["dropout"],
                        sequence_encoder=spec["sequence_encoder"])
    if spec.get("standardised"):  # runs made before it have none
        model = StandardisedInputs(model, dims, spec["standardised"])
    if spec["unfrozen"]:
        model = TopsAndHead(model, build_tops(spec["feature_sets"], spec["unfrozen"], spec.get("lora")))
    return ScaledScore(model, spec["output_scaling"]) if spec["task"] == "regression" else model


def model_with_weights(spec: dict, state_dict: dict, where: Path | str) -> nn.Module:
    """The model of a run's spec holding its weights. A head's spec is first checked against the
    weights on the meta device (no memory), so a spec that disagrees with them (a hidden size of
    2e7, weights of another shape) is a named error before anything is allocated."""
    import torch

    from msa.core.rundir import RunDirError

    try:
        if spec.get("kind") == "head" and not spec.get("unfrozen"):  # tops load pretrained weights: not on meta
            with torch.device("meta"):
                check_shapes(build_model(spec), state_dict, where)
        model = build_model(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise RunDirError(f"{where}: model.json does not describe a model msa can build ({err})") from None
    check_shapes(model, state_dict, where)
    model.load_state_dict(state_dict)
    return model


def check_shapes(model: nn.Module, state_dict: dict, where: Path | str) -> None:
    from msa.core.rundir import RunDirError

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = [k for k in expected if k in stored and expected[k] != stored[k]]
    if missing or unexpected or wrong:
        what = (f"{wrong[0]} is {list(stored[wrong[0]])} in the weights, {list(expected[wrong[0]])} in the spec"
                if wrong else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise RunDirError(f"{where}: model.json and model.safetensors do not fit together ({what}); "
                          "train the run again")


def is_run_dir(name: str | None) -> bool:
    """True for an msa run directory (its model.json and weights), which can serve as a model."""
    return bool(name) and (Path(name) / "model.json").is_file() and (Path(name) / "model.safetensors").is_file()


def run_text_options(run_dir: str) -> dict:
    """The text options a run's encoder was trained with (extract must use the same)."""
    spec = json.loads((Path(run_dir) / "model.json").read_text())
    if spec.get("kind") == "head":  # tops trained on a cache: the options of the extract that made it
        recorded = spec.get("feature_sets", {}).get("text", {}).get("extract_config", {})
        return {"max_len": recorded.get("max_len"), "pooling": recorded.get("pooling")}
    return {"max_len": spec.get("max_len"), "pooling": spec.get("pooling")}


def text_encoder_of_run(run_dir: str) -> TextEncoder:
    """The text encoder of a run, with its trained weights (LoRA adapters merged in, tops
    included), to extract features with like any pretrained model: a finetune run's own, or the
    encoder that extracted a train-head run's cache with the top layers that run trained."""
    from msa.core import rundir

    state_dict, spec = rundir.load_model(run_dir)
    model = model_with_weights(spec, state_dict, run_dir)
    if spec.get("kind") == "end-to-end":
        text = model.encoders["text"]
    elif spec.get("kind") == "head" and "text" in spec.get("unfrozen", {}):
        recorded = spec["feature_sets"]["text"]["extract_config"]
        text = TextEncoder(recorded["text_model"], recorded["max_len"], recorded["pooling"])
        trained = list(model.tops["text"].layers())
        layers = top_layers(text.model, len(trained))
        if spec.get("lora"):
            add_lora(layers, spec["lora"]["rank"], tuple(spec["lora"].get("targets") or ()))
        for layer, trained_layer in zip(layers, trained, strict=True):
            layer.load_state_dict(trained_layer.state_dict())
    else:
        raise ConfigError(f"{run_dir}: a {spec.get('kind')} run without trained text layers has no text encoder of "
                          "its own; use a finetune run or a train-head run with --unfreeze-text-layers")
    for module in text.model.modules():  # fold each adapter into its linear layer: plain weights again
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    return text.eval()


def build_tops(feature_info: dict[str, dict], counts: dict[str, int | str],
               lora: dict | None = None) -> dict[str, nn.Module]:
    """Encoder tops with the pretrained weights of the encoders that extracted the features;
    with `lora` ({"rank", "targets"}), the text top trains through adapters in its layers alone."""
    tops = {}
    for modality, count in counts.items():
        if modality not in feature_info:
            raise ConfigError(f"cannot unfreeze the {modality} encoder: the run reads no {modality} features")
        fingerprint, recorded = feature_info[modality]["fingerprint"], feature_info[modality]["extract_config"]
        key, option = SPLIT_OPTIONS[modality]
        if modality == "text":
            encoder = TextEncoder(recorded["text_model"], recorded["max_len"], recorded["pooling"])
            total = len(transformer_layers(encoder.model))
        else:
            encoder = build_image_encoder(recorded["image_model"], recorded["image_weights"])
            total = len(trunk_stages(encoder.trunk)[1])
        cached = fingerprint.get(key)
        # "all" and the layer count are the same split
        if cached is None or resolve_layer_count(cached, total, option) != resolve_layer_count(count, total, option):
            raise CacheError(f"{feature_info[modality]['name']} was extracted with {option} "
                             f"{cached}; unfreezing {count} needs {option} {count}")
        if modality == "text":
            tops[modality] = encoder.top(count)
            tops[modality].requires_grad_(not lora)
            if lora:
                add_lora(list(tops[modality].layers()), lora["rank"], tuple(lora.get("targets") or ()))
        else:
            top = encoder.split(count)[1]
            top.requires_grad_(False)
            top.trunk.requires_grad_(True)  # the stages only: a timm pool holds the whole model
            tops[modality] = top
    return tops
