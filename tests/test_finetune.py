"""Unfrozen encoder tops on cached split activations, and end-to-end fine-tuning (`msa finetune`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from msa.cache.features import CacheError, FeatureSet
from msa.cache.manifest import read_manifest
from msa.core import rundir
from msa.core.config import ConfigError, EvaluateConfig, FinetuneConfig, PredictConfig, TrainHeadConfig
from msa.models.build import build_model, build_tops
from msa.models.unfrozen import TopsAndHead, parameter_groups
from msa.stages import evaluate, extract, finetune, predict, train_head
from msa.training import raw
from msa.training.bank import FeatureBank


@pytest.fixture
def split_cache(extract_config):
    cfg = extract_config(text_split_layer=1, image_split_stage=1)
    result = extract.run(cfg, show_progress=False)
    return cfg, {m: FeatureSet.open(r.path) for m, r in result.feature_sets.items()}


@pytest.fixture
def finetune_config(messy_data_source, tiny_models, tmp_path):
    def make(**overrides) -> FinetuneConfig:
        cfg = FinetuneConfig(data=messy_data_source, out=tmp_path / "ft", text_model=tiny_models["text"], max_len=16,
                             image_model="timm:test_efficientnet", image_weights=tiny_models["image_weights"],
                             hidden=16, unfreeze_text_layers=1, unfreeze_image_stages=1, epochs=2, batch_size=8,
                             lr_encoder=1e-3, lr_fusion=1e-3, lr_head=1e-3, device="cpu",
                             precision="fp32")
        return dataclasses.replace(cfg, **overrides)

    return make


def test_split_activations_are_cached_with_their_own_fingerprint(split_cache, extract_config):
    _, sets = split_cache
    assert sets["text"].fingerprint["split_layer"] == 1 and sets["image"].fingerprint["split_stage"] == 1
    assert sets["text"].shapes["split"] == (*sets["text"].shapes["mask"], 32)  # [N, max_len, hidden]
    assert len(sets["image"].shapes["split"]) == 4  # [N, C, h, w]
    plain = extract.run(extract_config(), show_progress=False).feature_sets
    assert {plain[m].name for m in plain}.isdisjoint({fs.name for fs in sets.values()})
    # The final features do not depend on whether the split was stored too.
    for modality, feature_set in sets.items():
        np.testing.assert_array_equal(FeatureSet.open(plain[modality].path).load("pooled"), feature_set.load("pooled"))


def head_spec(sets: dict, bank: FeatureBank, fusion: str, unfrozen: dict) -> dict:
    """The model spec train-head writes, for a head on these cached sets."""
    return {"kind": "head", "fusion": fusion, "hidden": 16, "dropout": 0.1, "task": "classification", "outputs": 3,
            "sequence_encoder": "lstm", "output_scaling": "tanh", "unfrozen": unfrozen,
            "dims": {m: dataclasses.asdict(d) for m, d in bank.dims().items()},
            "feature_sets": {m: {"name": fs.name, "fingerprint": fs.fingerprint, **fs.notes} for m, fs in sets.items()}}


def end_to_end_model(cfg: FinetuneConfig):
    return build_model(finetune.model_spec(finetune.resolved(cfg)))


def assert_same_logits(cached, bank: FeatureBank, end_to_end, cache) -> None:
    """Every item's logits from the cached path and end to end agree (fp32)."""
    manifest = read_manifest(cache)
    data = raw.RawData.read(manifest, end_to_end.encoders["text"], clean=False)
    rows = torch.arange(len(manifest))
    with torch.no_grad():
        from_cache = cached(bank.batch(rows, with_tokens=True))["logits"]
        pixels = raw.load_pixels(end_to_end, data, rows)
        direct = end_to_end(raw.batch_inputs(end_to_end, data, rows, pixels, None, torch.device("cpu")))["logits"]
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, "all"])
def test_cached_tops_give_the_same_logits_as_end_to_end(depth, extract_config, finetune_config):
    cfg = extract_config(text_split_layer=depth, image_split_stage=depth)
    sets = {m: FeatureSet.open(r.path) for m, r in extract.run(cfg, show_progress=False).feature_sets.items()}
    bank = FeatureBank.load(sets, with_tokens=True, split_names=("text", "image"))
    cached = build_model(head_spec(sets, bank, "co-attn", {"text": depth, "image": depth})).eval()
    end_to_end = end_to_end_model(finetune_config(fusion="co-attn", unfreeze_text_layers=depth,
                                                  unfreeze_image_stages=depth)).eval()
    end_to_end.head.load_state_dict(cached.head.state_dict())
    assert_same_logits(cached, bank, end_to_end, cfg.cache)


@pytest.mark.parametrize("depth", [1, "all"])
def test_cached_adapters_give_the_same_logits_as_end_to_end_adapters(depth, extract_config, finetune_config):
    """LoRA in the top K text layers: trained on cached activations (train-head) or end to end
    (finetune), the same model, adapters in those K layers only and nothing else of the encoder trained."""
    from msa.models.text import top_layers

    cfg = extract_config(text_split_layer=depth)
    sets = {m: FeatureSet.open(r.path) for m, r in extract.run(cfg, show_progress=False).feature_sets.items()}
    bank = FeatureBank.load(sets, with_tokens=True, split_names=("text",))
    spec = {**head_spec(sets, bank, "concat", {"text": depth}), "lora": {"rank": 4, "targets": []}}
    cached = build_model(spec).eval()
    torch.manual_seed(0)
    for name, parameter in cached.named_parameters():
        if "lora_B" in name:  # adapters start at zero: give them something to say
            parameter.data.normal_(0, 0.2)
    end_to_end = end_to_end_model(finetune_config(fusion="concat", unfreeze_text_layers=depth, unfreeze_image_stages=0,
                                                  lora_rank=4)).eval()
    end_to_end.head.load_state_dict(cached.head.state_dict())
    adapted = top_layers(end_to_end.encoders["text"].model, depth)
    for mine, theirs in zip(cached.tops["text"].layers(), adapted, strict=True):
        theirs.load_state_dict(mine.state_dict())
    every_layer = len(top_layers(end_to_end.encoders["text"].model, "all"))
    lora_layers = {n.split(".layer.")[1].split(".")[0] for n, _ in end_to_end.named_parameters() if "lora_" in n}
    assert lora_layers == {str(i) for i in range(every_layer - len(adapted), every_layer)}  # those K only
    for model in (cached, end_to_end):
        trained = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        assert trained and all("lora_" in n for n in trained)
    assert_same_logits(cached, bank, end_to_end, cfg.cache)


def test_train_head_trains_adapters_from_the_cache_and_predicts(split_cache, tmp_path):
    cfg, sets = split_cache
    run_cfg = TrainHeadConfig(cache=cfg.cache, fusion="concat", out=tmp_path / "run", epochs=2, hidden=16,
                              unfreeze_text_layers=1, lora_rank=2, lr_encoder=1e-2, batch_size=4)
    result = train_head.run(run_cfg, log=lambda *_: None)
    state_dict, spec = rundir.load_model(result.run_dir)
    assert spec["lora"] == {"rank": 2, "targets": []}
    adapters = {k: v for k, v in state_dict.items() if "lora_B" in k}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())  # the adapters were trained
    _, own = predict.run(PredictConfig(run=result.run_dir, split="val"), show_progress=False)
    saved = pd.read_parquet(result.run_dir / "val_predictions.parquet")
    assert own.predicted == saved.prediction.tolist()
    with pytest.raises(ConfigError, match="--lora-rank puts adapters in the unfrozen text layers"):
        train_head.run(dataclasses.replace(run_cfg, unfreeze_text_layers=0, out=tmp_path / "run2"),
                       log=lambda *_: None)


def test_adapters_trained_on_the_cache_export_as_an_encoder(split_cache, extract_config, tmp_path):
    """`msa extract --text-model RUN` of a train-head run: the cache's encoder with the run's adapted
    top layers, whose features equal what the run's tops compute on the cached activations."""
    cfg, sets = split_cache
    run_dir = train_head.run(TrainHeadConfig(cache=cfg.cache, fusion="concat", out=tmp_path / "run", epochs=1,
                                             hidden=16, unfreeze_text_layers=1, lora_rank=2, lr_encoder=1e-2,
                                             batch_size=4, precision="fp32"), log=lambda *_: None).run_dir
    exported = extract.run(extract_config(text_model=str(run_dir), modalities=("text",), cache=tmp_path / "c"),
                           show_progress=False)
    features = FeatureSet.open(exported.feature_sets["text"].path).load("pooled")[:8].astype(np.float32)
    model = build_model(rundir.load_model(run_dir)[1])
    model.load_state_dict(rundir.load_model(run_dir)[0])
    split = torch.from_numpy(sets["text"].load("split")[:8].astype(np.float32))
    mask = torch.from_numpy(sets["text"].load("mask")[:8])
    with torch.no_grad():
        _, pooled = model.tops["text"].eval()(split, mask)
    np.testing.assert_allclose(features, pooled.numpy(), atol=3e-3, rtol=3e-3)
    plain = FeatureSet.open(extract.run(extract_config(modalities=("text",), cache=tmp_path / "c"),
                                        show_progress=False).feature_sets["text"].path).load("pooled")[:8]
    assert not np.allclose(features, plain.astype(np.float32), atol=3e-3)  # the adapters changed them


def test_unfrozen_train_head_trains_the_tops_and_predicts(split_cache, tmp_path):
    cfg, sets = split_cache
    run_cfg = TrainHeadConfig(cache=cfg.cache, fusion="concat", out=tmp_path / "run", epochs=2, hidden=16,
                              unfreeze_text_layers=1, unfreeze_image_stages=1, lr_encoder=1e-2)
    result = train_head.run(run_cfg, log=lambda *_: None)
    state_dict, spec = rundir.load_model(result.run_dir)
    assert spec["unfrozen"] == {"text": 1, "image": 1}
    fresh = build_tops(spec["feature_sets"], {"text": 1})["text"].state_dict()
    trained = {k.removeprefix("tops.text."): v for k, v in state_dict.items()
               if k.startswith("tops.text.")}
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)  # the top layer was trained
    _, own = predict.run(PredictConfig(run=result.run_dir, split="val"), show_progress=False)
    saved = pd.read_parquet(result.run_dir / "val_predictions.parquet")
    assert own.predicted == saved.prediction.tolist()
    with pytest.raises(CacheError, match="needs --text-split-layer 2"):
        train_head.run(dataclasses.replace(run_cfg, unfreeze_text_layers=2, out=tmp_path / "run2"), log=lambda *_: None)


def test_a_split_that_does_not_fit_the_unfrozen_layers_fails_before_any_feature_is_loaded(split_cache, tmp_path,
                                                                                         monkeypatch):
    cfg, _ = split_cache
    monkeypatch.setattr(FeatureBank, "load", lambda *a, **k: pytest.fail("features loaded before the check"))
    with pytest.raises(CacheError, match="was extracted with --text-split-layer 1; unfreezing 3 needs"):
        train_head.run(TrainHeadConfig(cache=cfg.cache, fusion="concat", unfreeze_text_layers=3, out=tmp_path / "r"),
                       log=lambda *_: None)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_unfreezing_a_set_extracted_without_a_split_fails_before_loading_an_encoder(signal_cache, monkeypatch,
                                                                                     tmp_path):
    from msa.models import build

    monkeypatch.setattr(build, "TextEncoder", lambda *a, **k: pytest.fail("loaded the text encoder"))
    cfg = TrainHeadConfig(cache=signal_cache, fusion="concat", out=tmp_path / "run", unfreeze_text_layers=1)
    with pytest.raises(CacheError, match="holds no split activations; extract with --text-split-layer"):
        train_head.run(cfg, log=lambda *_: None)


def test_layer_wise_learning_rates_land_on_the_right_groups(split_cache):
    cfg, sets = split_cache
    bank = FeatureBank.load(sets, False, ("text",))
    model = build_model(head_spec(sets, bank, "concat", {"text": 1}))
    assert isinstance(model, TopsAndHead)
    groups = {g["name"]: g for g in parameter_groups(model, 1e-5, 5e-5, 1e-4, 0.01)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["encoder"] == {id(p) for p in model.tops.parameters()}
    assert ids["head"] == {id(p) for p in model.head.classify.parameters()}
    assert ids["fusion"] == {id(p) for p in model.head.project.parameters()}
    assert [groups[n]["lr"] for n in ("encoder", "fusion", "head")] == [1e-5, 5e-5, 1e-4]


def test_all_layers_means_every_transformer_layer_and_layer_decay_scales_their_rates(split_cache, finetune_config):
    model = end_to_end_model(finetune_config(unfreeze_text_layers="all", unfreeze_image_stages=0))
    text = model.encoders["text"].model
    assert all(p.requires_grad for p in text.encoder.layer.parameters())  # both layers of the tiny BERT
    assert not any(p.requires_grad for p in text.embeddings.parameters())
    groups = {g["name"]: g for g in parameter_groups(model, 1e-4, 5e-5, 1e-3, 0.01, layer_decay=0.5)}
    assert groups["text-depth-0"]["lr"] == 1e-4 and groups["text-depth-1"]["lr"] == 5e-5
    assert {id(p) for p in groups["text-depth-0"]["params"]} == {id(p) for p in text.encoder.layer[1].parameters()}
    assert {id(p) for p in groups["text-depth-1"]["params"]} == {id(p) for p in text.encoder.layer[0].parameters()}
    # On cached tops the same: the top kept by --unfreeze-text-layers 1 is layer 0 of its own stack.
    cfg, sets = split_cache
    bank = FeatureBank.load(sets, False, ("text",))
    cached = build_model(head_spec(sets, bank, "concat", {"text": 1}))
    cached_groups = {g["name"]: g for g in parameter_groups(cached, 1e-4, 5e-5, 1e-3, 0.01, layer_decay=0.5)}
    assert cached_groups["text-depth-0"]["lr"] == 1e-4 and "text-depth-1" not in cached_groups
    with pytest.raises(ConfigError, match="between 1 and 2"):
        end_to_end_model(finetune_config(unfreeze_text_layers=3))


def test_finetune_resume_gives_the_same_final_weights(finetune_config, tmp_path):
    whole = finetune.run(finetune_config(out=tmp_path / "whole", image_aug="weak"), show_progress=False,
                         log=lambda *_: None)

    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = finetune_config(out=tmp_path / "resumed", image_aug="weak")
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, show_progress=False, log=lambda *_: None, on_epoch=kill_after_first_epoch)
    finetune.run(cfg, resume=True, show_progress=False, log=lambda *_: None)
    a = rundir.load_checkpoint(whole / finetune.LAST)
    b = rundir.load_checkpoint(tmp_path / "resumed" / finetune.LAST)
    assert a["state"] == b["state"] and a["state"]["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert (whole / "history.csv").read_text().count("\n") == (tmp_path / "resumed" / "history.csv").read_text(
    ).count("\n") == 3


def test_finetune_trains_only_the_tops_and_augments_only_training(finetune_config, monkeypatch):
    seen = []
    real = finetune.image_augmentation

    def counting(preset, crop):
        transform = real(preset, crop)
        return lambda image: seen.append(image.shape) or transform(image)

    monkeypatch.setattr(finetune, "image_augmentation", counting)
    cfg = finetune_config(image_aug="strong", epochs=1)
    run_dir = finetune.run(cfg, show_progress=False, log=lambda *_: None)
    manifest = read_manifest(run_dir)
    assert len(seen) == len(manifest.rows_of_split("train"))  # not the val items evaluated after it
    trained = rundir.load_model(run_dir)[0]
    fresh = end_to_end_model(cfg).state_dict()
    layers = "encoders.text.model.encoder.layer."
    query = "attention.self.query.weight"
    assert torch.equal(trained[layers + "0." + query], fresh[layers + "0." + query])
    assert not torch.equal(trained[layers + "1." + query], fresh[layers + "1." + query])
    assert torch.equal(trained["encoders.image.trunk.model.conv_stem.weight"],
                       fresh["encoders.image.trunk.model.conv_stem.weight"])
    # The run directory serves predict and evaluate unchanged.
    _, own = predict.run(PredictConfig(run=run_dir, split="val"), show_progress=False)
    assert own.predicted == pd.read_parquet(run_dir / "val_predictions.parquet").prediction.tolist()
    report = evaluate.run(EvaluateConfig(run=run_dir))
    assert 0 <= report["metrics"]["macro_f1"] <= 1


def test_clean_text():
    assert raw.clean_text("so #happy  @bob see http://t.co/x1 www.a.com now") == "so happy see now"


def test_lora_trains_its_adapters_and_leaves_the_base_weights(finetune_config):
    cfg = finetune_config(lora_rank=2, unfreeze_text_layers=0, unfreeze_image_stages=0, epochs=1, lr_encoder=1e-2)
    run_dir = finetune.run(cfg, show_progress=False, log=lambda *_: None)
    trained, spec = rundir.load_model(run_dir)
    assert spec["lora_rank"] == 2
    fresh = end_to_end_model(cfg).state_dict()
    adapters = [k for k in trained if "lora_" in k]
    assert adapters and all(k in fresh for k in adapters)
    assert any(not torch.equal(trained[k], fresh[k]) for k in adapters if "lora_B" in k)  # B starts at zero
    base = [k for k in trained if k.startswith("encoders.text.") and "lora_" not in k]
    assert base and all(torch.equal(trained[k], fresh[k]) for k in base)  # the encoder's own weights: frozen
    _, own = predict.run(PredictConfig(run=run_dir, split="val"), show_progress=False)  # the run alone rebuilds it
    assert own.predicted == pd.read_parquet(run_dir / "val_predictions.parquet").prediction.tolist()


def test_a_finetuned_encoder_extracts_features_like_any_model(finetune_config, extract_config):
    """`msa extract --text-model RUN`: the run's adapted text encoder (LoRA merged) as stage 1's model."""
    cfg = finetune_config(lora_rank=2, unfreeze_text_layers=1, unfreeze_image_stages=0, epochs=1, lr_encoder=1e-2)
    run_dir = finetune.run(cfg, show_progress=False, log=lambda *_: None)
    result = extract.run(extract_config(text_model=str(run_dir), modalities=("text",)), show_progress=False)
    cached = FeatureSet.open(result.feature_sets["text"].path)
    assert cached.fingerprint["max_len"] == 16 and cached.fingerprint["model"] == "local"
    model = build_model(rundir.load_model(run_dir)[1])
    model.load_state_dict(rundir.load_model(run_dir)[0])
    text = model.encoders["text"].eval()  # adapters not merged: the same function
    texts = read_manifest(extract_config().cache).column("text")
    with torch.no_grad():
        ids, mask = text.collate(text.tokenize(texts[:8]))
        _, pooled = text(ids, mask)
    np.testing.assert_allclose(cached.load("pooled")[:8].astype(np.float32), pooled.numpy(), atol=2e-3, rtol=2e-3)


def test_finetune_applies_r_drop(finetune_config, tmp_path):
    plain = finetune.run(finetune_config(out=tmp_path / "plain", epochs=1), show_progress=False, log=lambda *_: None)
    rdrop = finetune.run(finetune_config(out=tmp_path / "rdrop", epochs=1, rdrop_alpha=1.0), show_progress=False,
                         log=lambda *_: None)
    a, b = rundir.load_model(plain)[0], rundir.load_model(rdrop)[0]
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("head."))  # the KL term moved the head


def test_the_recipe_script_says_what_it_needs(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).parent.parent / "recipes" / "mvsa.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash recipes/mvsa.sh DATA_DIR OUT_DIR" in usage.stderr
    missing = subprocess.run(["bash", str(script), str(tmp_path), str(tmp_path / "out")], capture_output=True,
                             text=True, env={"MSA_OFFLINE_MODELS": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and "all-mpnet-base-v2/config.json missing" in missing.stderr


def test_finetune_cross_validates_on_the_stored_folds_and_predicts_with_its_folds(finetune_config, tmp_path):
    cfg = finetune_config(out=tmp_path / "cv", folds=2, epochs=1)
    run_dir = finetune.run(cfg, show_progress=False, log=lambda *_: None)
    manifest = read_manifest(run_dir)
    fold_of = dict(zip(manifest.guids, manifest.folds(2)))
    metrics = rundir.read_json(run_dir / rundir.METRICS)
    assert metrics["folds"] == 2 and len(metrics["per_fold"]) == 2
    assert metrics["accuracy"] == pytest.approx(np.mean([m["accuracy"] for m in metrics["per_fold"]]))
    for k in range(2):
        val = pd.read_parquet(run_dir / f"fold-{k}" / rundir.VAL_PREDICTIONS)
        assert {fold_of[g] for g in val.guid} == {k}
    members = [predict.predict(run_dir / f"fold-{k}", split="test", show_progress=False) for k in range(2)]
    together = predict.predict(run_dir, split="test", show_progress=False)
    assert together.guids == members[0].guids and len(together.guids) > 0
    np.testing.assert_allclose(together.probabilities, np.mean([m.probabilities for m in members], axis=0),
                               atol=1e-6)
    report = evaluate.run(EvaluateConfig(run=run_dir))  # out of fold: every labelled item once
    assert report["metrics"]["n"] == int((manifest.folds(2) >= 0).sum())

    # A rerun of an unfinished cross-validation keeps its finished folds.
    (run_dir / rundir.METRICS).unlink()
    (run_dir / "fold-1" / rundir.METRICS).unlink()
    kept = (run_dir / "fold-0" / rundir.MODEL_WEIGHTS).stat().st_mtime_ns
    finetune.run(cfg, show_progress=False, log=lambda *_: None)
    assert (run_dir / "fold-0" / rundir.MODEL_WEIGHTS).stat().st_mtime_ns == kept
    assert (run_dir / "fold-1" / rundir.METRICS).is_file() and (run_dir / rundir.METRICS).is_file()


def test_finetune_refit_trains_every_label_for_the_selected_epochs_and_predict_uses_it(finetune_config, tmp_path):
    run_dir = finetune.run(finetune_config(out=tmp_path / "r", refit=True, epochs=2), show_progress=False,
                           log=lambda *_: None)
    best_epoch = rundir.read_json(run_dir / rundir.METRICS)["best_epoch"]
    refit = run_dir / rundir.REFIT_DIR
    assert rundir.read_json(refit / rundir.METRICS)["refit"]["epochs"] == best_epoch
    refit_manifest = read_manifest(refit)
    assert set(refit_manifest.column("split")) <= {"train", "test"}
    assert len(refit_manifest.rows_of_split("train")) == len(read_manifest(run_dir).labelled_rows())
    assert len(rundir.read_history(refit)) == best_epoch and rundir.is_finished(run_dir)
    np.testing.assert_array_equal(predict.predict(run_dir, split="test", show_progress=False).probabilities,
                                  predict.predict(refit, split="test", show_progress=False).probabilities)
