"""The quality levers (issue 13): the linear baseline head and the lexicon modality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from msa.cache.features import FeatureSet
from msa.cache.manifest import read_manifest
from msa.core.compute import resolve_compute
from msa.core.config import TrainHeadConfig
from msa.models.heads import ModalityDims, fit_standardisers
from msa.models.lexicon import FEATURES, LexiconScorer
from msa.models.registry import create_head
from msa.stages import extract, train_head
from msa.training.bank import FeatureBank


def test_lexicon_features_are_vader_s_and_the_emoji_ranking_s(extract_config):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    cfg = extract_config(modalities=("lexicon",))
    result = extract.run(cfg, show_progress=False)
    lexicon = FeatureSet.open(result.feature_sets["lexicon"].path)
    assert lexicon.shapes["pooled"] == (37, len(FEATURES)) and lexicon.fingerprint["model"] == "vader-emoji"
    texts = read_manifest(cfg.cache).column("text")
    vader = SentimentIntensityAnalyzer()
    expected = np.array([[vader.polarity_scores(t)[k] for k in ("neg", "neu", "pos", "compound")] for t in texts])
    np.testing.assert_allclose(lexicon.load("pooled")[:, :4].astype(float), expected, atol=1e-3)  # stored float16
    scores = LexiconScorer()(["so happy 😂😂 !!", "plain text"])
    assert scores[0, FEATURES.index("emoji_count")] == pytest.approx(np.log1p(2))
    # 😂 in the Emoji Sentiment Ranking: 6845 positive, 3614 negative of 14622 occurrences.
    assert scores[0, FEATURES.index("emoji_mean")] == pytest.approx((6845 - 3614) / 14622, abs=1e-6)
    assert scores[1, FEATURES.index("emoji_count")] == 0 and scores[0, FEATURES.index("exclamations")] > 0


def test_a_cache_with_lexicon_features_trains_every_modality(extract_config, tmp_path):
    cfg = extract_config(modalities=("text", "image", "lexicon"))
    extract.run(cfg, show_progress=False)
    result = train_head.run(TrainHeadConfig(cache=cfg.cache, fusion="concat", out=tmp_path / "run", epochs=2))
    assert train_head.rundir.read_json(result.run_dir / "config.json")["modalities_used"] == ["text", "image",
                                                                                             "lexicon"]


def test_the_linear_head_is_a_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 3))).argmax(1)
    unscaled = (x * [0.01, 1, 30, 100, 0.5, 5] + [3, -1, 50, 0, 2, -7]).astype(np.float32)  # as features come
    head = create_head("linear", {"a": ModalityDims(4, 4), "b": ModalityDims(2, 2)}, 3, 16, 0.0)
    assert sum(p.numel() for p in head.parameters()) == 6 * 3 + 3  # one linear layer, nothing else
    bank = FeatureBank({"a": torch.from_numpy(unscaled[:, :4]), "b": torch.from_numpy(unscaled[:, 4:])}, {}, {})
    fit_standardisers(head, bank.statistics(np.arange(600)))
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200)
    inputs = {"a": _modality(unscaled[:, :4]), "b": _modality(unscaled[:, 4:])}
    targets = torch.from_numpy(y)

    def closure():
        optimizer.zero_grad()
        logits = head(inputs)["logits"]
        # sklearn's objective: mean cross-entropy plus an L2 penalty of 1 / (2 C n) per weight, C = 1.
        loss = torch.nn.functional.cross_entropy(logits, targets) + head.classify.weight.pow(2).sum() / (2 * 600)
        loss.backward()
        return loss

    optimizer.step(closure)
    # The same model in scikit-learn: StandardScaler on the training rows, then a logistic regression.
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(unscaled, y)
    ours = head(inputs)["logits"].argmax(1).numpy()
    assert (ours == reference.predict(unscaled)).mean() > 0.98
    np.testing.assert_allclose(head.classify.weight.detach().numpy(), reference[-1].coef_, atol=0.05)


def _modality(values: np.ndarray):
    from msa.models.heads import Modality

    return Modality(torch.from_numpy(values))


def test_an_ensemble_averages_the_runs_probabilities_exactly(signal_cache, tmp_path):
    from msa.core.config import PredictConfig
    from msa.stages import predict

    runs = [train_head.run(TrainHeadConfig(cache=signal_cache, fusion=f, seed=s, out=tmp_path / f"{f}{s}",
                                           epochs=2)).run_dir for f, s in (("concat", 0), ("gmu", 1), ("linear", 2))]
    members = [predict.predict(r, split="val", show_progress=False) for r in runs]
    out = tmp_path / "ensemble.txt"
    path, averaged = predict.run(PredictConfig(run=runs[0], ensemble=tuple(runs[1:]), split="val", out=out,
                                               probs=True), show_progress=False)
    np.testing.assert_array_equal(averaged.probabilities, np.mean([m.probabilities for m in members], axis=0))
    recorded = train_head.rundir.read_json(tmp_path / "ensemble.txt.runs.json")
    assert recorded["runs"] == [str(r.resolve()) for r in runs] and recorded["weights"] == [1 / 3] * 3
    assert path.read_text().splitlines()[0] == "guid,tag,p_negative,p_neutral,p_positive"


def test_folds_are_stratified_disjoint_complete_and_fixed():
    from msa.data.folds import stratified_folds

    rng = np.random.default_rng(3)
    labels = list(rng.choice(["negative", "neutral", "positive"], size=203, p=[0.3, 0.1, 0.6])) + [None] * 7
    folds = stratified_folds(labels, 5)
    assert (folds[-7:] == -1).all() and set(folds[:-7]) == set(range(5))  # every labelled item in one fold
    np.testing.assert_array_equal(folds, stratified_folds(labels, 5))  # the same on every run
    sizes = np.bincount(folds[:-7])
    assert sizes.max() - sizes.min() <= 1
    for label in ("negative", "neutral", "positive"):
        per_fold = np.bincount(folds[:-7][np.asarray(labels[:-7]) == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1  # stratified


def test_the_manifest_stores_the_folds_and_every_cross_validation_of_the_cache_uses_them(signal_cache, tmp_path):
    manifest = read_manifest(signal_cache)
    stored = np.asarray(manifest.column("fold"))
    assert manifest.info["folds"] == 5 and set(stored[stored >= 0]) == set(range(5))
    assert (stored[np.asarray(manifest.column("split")) == "test"] == -1).all()
    tables = []
    for seed in (0, 1):
        train_head.run(TrainHeadConfig(cache=signal_cache, fusion="linear", folds=5, seed=seed, epochs=1,
                                       out=tmp_path / f"cv{seed}", baseline=False))
        tables.append(__import__("pandas").read_csv(tmp_path / f"cv{seed}" / "folds.csv", dtype={"guid": str}))
    assert tables[0].equals(tables[1])
    fold_of = dict(zip(manifest.guids, stored))
    assert [fold_of[g] for g in tables[0].guid] == tables[0].fold.tolist()  # the manifest's, not recomputed
    for k in range(5):  # each fold run validated on its fold
        val = __import__("pandas").read_parquet(tmp_path / "cv0" / f"fold-{k}" / "val_predictions.parquet")
        assert {fold_of[g] for g in val.guid} == {k}


def test_cross_validation_reports_mean_and_std_and_predicts_with_the_fold_ensemble(signal_cache, tmp_path):
    from msa.core.config import PredictConfig
    from msa.stages import predict

    result = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", folds=3, out=tmp_path / "cv",
                                            epochs=2))
    per_fold = [m["macro_f1"] for m in result.metrics["per_fold"]]
    assert result.metrics["folds"] == 3 and result.metrics["macro_f1"] == pytest.approx(np.mean(per_fold))
    assert result.metrics["macro_f1_std"] == pytest.approx(np.std(per_fold))
    folds = __import__("pandas").read_csv(tmp_path / "cv" / "folds.csv", dtype={"guid": str})
    manifest = read_manifest(signal_cache)
    labelled = {g for g, lab in zip(manifest.guids, manifest.column("label")) if lab}
    assert set(folds.guid) == labelled and len(folds) == len(labelled)
    members = [predict.predict(tmp_path / "cv" / f"fold-{k}", show_progress=False) for k in range(3)]
    _, together = predict.run(PredictConfig(run=tmp_path / "cv"), show_progress=False)
    np.testing.assert_array_equal(together.probabilities, np.mean([m.probabilities for m in members], axis=0))
    assert len(together.guids) == 20  # the test items
    from msa.core.config import EvaluateConfig
    from msa.stages import evaluate

    report = evaluate.run(EvaluateConfig(run=tmp_path / "cv"))  # the folds' val predictions: every label once
    assert report["metrics"]["n"] == len(labelled)


def test_a_sweep_ranks_by_cross_validation(signal_cache, tmp_path):
    from msa.core.config import SweepConfig
    from msa.stages import sweep

    cfg = SweepConfig(base=TrainHeadConfig(cache=signal_cache, epochs=2, folds=2), out=tmp_path / "sweep",
                      fusions=("linear", "concat"), seeds=(0,))
    table = sweep.run(cfg, show_progress=False)
    for _, row in table.iterrows():
        metrics = train_head.rundir.read_json(tmp_path / "sweep" / row["run"] / "metrics.json")
        assert metrics["folds"] == 2 and row["macro_f1"] == pytest.approx(metrics["macro_f1"])


def test_multi_layer_pooling_averages_the_last_layers(tiny_models):
    from msa.models.text import TextEncoder, pool_tokens

    encoder = TextEncoder(tiny_models["text"], 16, "mean", pool_layers=2)
    ids, mask = encoder.collate(encoder.tokenize(["a happy day", "sad"]))
    with torch.no_grad():
        tokens, pooled = encoder(ids, mask)
        states = encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    expected = (pool_tokens(states[-1], mask, "mean") + pool_tokens(states[-2], mask, "mean")) / 2
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(tokens, states[-1])


def test_a_fold_ensemble_extracts_new_data_once(signal_cache, tmp_path, monkeypatch):
    from msa.core.config import PredictConfig
    from msa.data.demo import make_demo_dataset
    from msa.stages import predict

    train_head.run(TrainHeadConfig(cache=signal_cache, fusion="linear", folds=2, out=tmp_path / "cv", epochs=1))
    new = make_demo_dataset(tmp_path / "new", n_labelled=4, n_test=6, seed=9)
    encoded = []
    from msa.models.modalities.text import TextModality

    real = TextModality.encode
    monkeypatch.setattr(TextModality, "encode", lambda self, encoder, job: encoded.append(len(job.rows)) or
                        real(self, encoder, job))
    _, predictions = predict.run(PredictConfig(run=tmp_path / "cv", data=new), show_progress=False)
    assert len(predictions.guids) == 6 and encoded == [10]  # one text extraction for both folds
    assert not list((tmp_path / "cv").glob("fold-*/predict-cache"))


@pytest.mark.parametrize("folds", [0, 2])
def test_refit_trains_on_every_label_for_the_selected_epochs_and_predict_uses_it(folds, signal_cache, tmp_path):
    import pandas as pd

    from msa.core import rundir
    from msa.stages import predict

    run = tmp_path / "run"
    result = train_head.run(TrainHeadConfig(cache=signal_cache, fusion="concat", epochs=4, patience=1, folds=folds,
                                            refit=True, out=run), log=lambda *_: None)
    refit = rundir.read_json(run / "metrics.json")["refit"]
    labelled = sum(1 for label in read_manifest(signal_cache).column("label") if label)
    assert refit["items"] == labelled == 150 and refit["epochs"] == result.best_epoch
    history = pd.read_csv(run / "refit" / "history.csv")
    assert history.epoch.tolist() == list(range(1, result.best_epoch + 1))
    assert not [c for c in history.columns if c.startswith("val_")]  # nothing is validated after selection
    from_run = predict.predict(run, show_progress=False)
    refit_alone = predict.predict(run / "refit", show_progress=False)
    np.testing.assert_array_equal(from_run.probabilities, refit_alone.probabilities)
    selected, _ = rundir.load_model(run / "fold-0" if folds else run)  # the selection model, which saw fewer labels
    refitted, _ = rundir.load_model(run / "refit")
    assert selected.keys() == refitted.keys() and not all(torch.equal(selected[k], refitted[k]) for k in selected)
    (run / "refit" / "metrics.json").unlink()  # as when the refit was killed
    with pytest.raises(rundir.RunDirError, match="refit is unfinished"):
        predict.predict(run, show_progress=False)


def test_evaluate_of_an_ensemble_of_cross_validations_averages_out_of_fold(signal_cache, tmp_path):
    from msa.core.config import EvaluateConfig
    from msa.stages import evaluate

    runs = [train_head.run(TrainHeadConfig(cache=signal_cache, fusion=fusion, epochs=2, folds=3, precision="fp32",
                                           out=tmp_path / fusion), log=lambda *_: None).run_dir
            for fusion in ("late", "gmu")]
    tables = [evaluate.val_predictions(r).set_index("guid").sort_index() for r in runs]
    columns = [c for c in tables[0].columns if c.startswith("p_")]
    expected = (tables[0][columns] + tables[1][columns]) / 2
    report = evaluate.run(EvaluateConfig(run=runs[0], ensemble=(runs[1],), out=tmp_path / "evaluation"))
    predicted = expected.idxmax(axis=1).str.removeprefix("p_")
    truth = tables[0]["label"]
    assert report["metrics"]["n"] == len(truth) == len(set(truth.index))  # every labelled item once
    assert report["metrics"]["accuracy"] == pytest.approx(float((predicted == truth).mean()))


def test_tweets_are_normalised_as_documented(extract_config):
    from msa.data.normalise import normalise_tweet

    assert normalise_tweet("RT @jenny: #NotJustForGirls soooo happy 😍 https://t.co/x") == \
        "@user: not just for girls soo happy smiling face with heart-eyes http"
    assert normalise_tweet("#LarryIsReal2 @a_b www.x.org") == "larry is real 2 @user http"
    raw = extract.feature_fingerprint(extract_config(), "text", "m", resolve_compute("cpu", "fp32"))
    tweet = extract.feature_fingerprint(extract_config(text_normalise="tweet"), "text", "m",
                                        resolve_compute("cpu", "fp32"))
    assert "text_normalise" not in raw and tweet["text_normalise"] == "tweet"  # a set of its own
