"""Evaluate a run: metrics, the bad cases, modality agreement, and the GMU gate.

Without `--labels`, the run's validation predictions are evaluated; with a `guid,tag`
file, the run predicts those items from its cache first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Group
from rich.table import Table

from msa.cache.manifest import read_manifest
from msa.pipeline import rundir
from msa.pipeline.config import ConfigError, EvaluateConfig
from msa.pipeline.metrics import classification_metrics, regression_metrics
from msa.pipeline.mvsa import read_label_file
from msa.pipeline.tasks import task_of_metrics
from msa.stages.predict import predict


def run_predictions(run_dir: Path, labels_file: Path | None) -> pd.DataFrame:
    """guid, label, prediction, p_<class>... (and gate) for the items evaluated."""
    if labels_file is None:
        return pd.read_parquet(Path(run_dir) / rundir.VAL_PREDICTIONS)
    wanted = {guid: label for guid, label, _ in read_label_file(Path(labels_file), labelled=True)}
    predictions = predict(run_dir, split="all", show_progress=False)
    table = rundir.predictions_table(predictions.guids, predictions.labels, predictions.probabilities,
                                     predictions.class_names, predictions.gate).to_pandas()
    missing = sorted(set(wanted) - set(table["guid"]))
    if missing:
        raise ConfigError(f"{labels_file}: {len(missing)} guids are not in the run's cache "
                         f"(first: {', '.join(missing[:5])}); extract them first")
    table = table[table["guid"].isin(wanted)].copy()
    table["label"] = table["guid"].map(wanted)
    return table.reset_index(drop=True)


def agreement(fused: pd.DataFrame, text: pd.DataFrame, image: pd.DataFrame) -> dict:
    """How the unimodal runs agree, and which one the fused head follows when they disagree."""
    joined = fused[["guid", "label", "prediction"]].merge(
        text[["guid", "prediction"]].rename(columns={"prediction": "text"}), on="guid").merge(
        image[["guid", "prediction"]].rename(columns={"prediction": "image"}), on="guid")
    text_right = joined["text"] == joined["label"]
    image_right = joined["image"] == joined["label"]
    disagree = joined["text"] != joined["image"]
    counts = {
        "both right": int((text_right & image_right).sum()),
        "both wrong": int((~text_right & ~image_right).sum()),
        "only text right": int((text_right & ~image_right).sum()),
        "only image right": int((~text_right & image_right).sum()),
    }
    follows = {
        "text": int((disagree & (joined["prediction"] == joined["text"])).sum()),
        "image": int((disagree & (joined["prediction"] == joined["image"])).sum()),
        "neither": int((disagree & (joined["prediction"] != joined["text"])
                        & (joined["prediction"] != joined["image"])).sum()),
    }
    fused_right = joined["prediction"] == joined["label"]
    return {"items": len(joined), "unimodal": counts, "fused follows": follows,
            "fused accuracy by case": {
                "both right": _mean(fused_right[text_right & image_right]),
                "both wrong": _mean(fused_right[~text_right & ~image_right]),
                "only text right": _mean(fused_right[text_right & ~image_right]),
                "only image right": _mean(fused_right[~text_right & image_right])}}


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def gate_statistics(table: pd.DataFrame) -> dict:
    """Mean/std of the first modality's gate by true class and by correct / incorrect."""
    correct = np.where(table["prediction"] == table["label"], "correct", "incorrect")
    return {
        "by class": {k: {"mean": float(g.mean()), "std": float(g.std(ddof=0)), "n": len(g)}
                     for k, g in table.groupby("label")["gate"]},
        "by outcome": {k: {"mean": float(g.mean()), "std": float(g.std(ddof=0)), "n": len(g)}
                       for k, g in table["gate"].groupby(correct)},
    }


def run(cfg: EvaluateConfig) -> dict:
    if cfg.labels is None and task_of_metrics(rundir.read_json(Path(cfg.run) / rundir.METRICS)).name == "regression":
        return regression_report(cfg)
    table = run_predictions(cfg.run, cfg.labels)
    class_names = [c.removeprefix("p_") for c in table.columns if c.startswith("p_")]
    index = {name: i for i, name in enumerate(class_names)}
    metrics = classification_metrics(table["label"].map(index).to_numpy(),
                                     table["prediction"].map(index).to_numpy(), class_names)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)

    config = rundir.read_json(Path(cfg.run) / rundir.CONFIG)
    manifest = read_manifest(config["cache"])
    texts = dict(zip(manifest.guids, manifest.column("text")))
    wrong = table[table["prediction"] != table["label"]].copy()
    wrong.insert(1, "text", wrong["guid"].map(texts))
    wrong["confidence"] = wrong[[f"p_{c}" for c in class_names]].max(axis=1)
    wrong = wrong.sort_values("confidence", ascending=False)
    wrong.to_csv(out / "bad_cases.csv", index=False)
    errors = wrong.groupby(["label", "prediction"]).size().sort_values(ascending=False)
    report = {
        "metrics": metrics,
        "errors by type": {f"{t} -> {p}": int(n) for (t, p), n in errors.items()},
        "bad cases": str(out / "bad_cases.csv"),
    }
    if cfg.text_run and cfg.image_run:
        report["agreement"] = agreement(table, run_predictions(cfg.text_run, cfg.labels),
                                        run_predictions(cfg.image_run, cfg.labels))
    if "gate" in table.columns:
        report["gate"] = gate_statistics(table)
    rundir.write_json(out / "evaluation.json", report)
    return report


def regression_report(cfg: EvaluateConfig) -> dict:
    """Regression runs: the field's metrics on the validation predictions, and the largest errors."""
    table = pd.read_parquet(Path(cfg.run) / rundir.VAL_PREDICTIONS)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    table["error"] = table["prediction"] - table["score"]
    table.reindex(table["error"].abs().sort_values(ascending=False).index).to_csv(out / "bad_cases.csv", index=False)
    return {"metrics": regression_metrics(table["score"].to_numpy(), table["prediction"].to_numpy()),
            "bad cases": str(out / "bad_cases.csv")}


def report_tables(report: dict) -> Group:
    """The report for the terminal: per-class metrics, errors, agreement, gate."""
    m = report["metrics"]
    if "mae" in m:
        return Group(_pairs(f"{m['n']} items", {k: f"{v:.4f}" for k, v in m.items() if k != "n"}),
                     f"bad cases: {report['bad cases']}")
    per_class = Table(title=f"{m['n']} items: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
                            f"weighted-F1 {m['weighted_f1']:.4f}")
    for column in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(column)
    for name, c in m["per_class"].items():
        per_class.add_row(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    parts = [per_class, _pairs("errors (true -> predicted)", report["errors by type"])]
    if "agreement" in report:
        a = report["agreement"]
        parts.append(_pairs("text-only vs image-only", a["unimodal"]))
        parts.append(_pairs("fused head follows, where they disagree", a["fused follows"]))
    if "gate" in report:
        gate = {f"{group}: {k}": f"{v['mean']:.3f} ± {v['std']:.3f} (n={v['n']})"
                for group, stats in report["gate"].items() for k, v in stats.items()}
        parts.append(_pairs("text gate (GMU)", gate))
    return Group(*parts, f"bad cases: {report['bad cases']}")


def _pairs(title: str, values: dict) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(str(key), str(value))
    return table
