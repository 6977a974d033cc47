"""Evaluate a run: metrics, the bad cases, modality agreement, and the GMU gate.

Without `--labels` or `--data`, the run's validation predictions are evaluated; with a
`guid,tag` file and/or new MVSA data, the run predicts those items first (new data is
extracted with the run's encoders, as `msa predict --data` does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Group
from rich.table import Table

from msa.cache.manifest import read_manifest
from msa.core import rundir
from msa.core.config import ConfigError, EvaluateConfig
from msa.core.errors import CacheError
from msa.data.mvsa import read_label_file
from msa.stages.predict import data_tag, predict
from msa.training.metrics import classification_metrics, regression_metrics
from msa.training.tasks import task_of_metrics


def run_predictions(run_dir: Path, labels_file: Path | None, data: Path | None = None,
                    cache: Path | None = None) -> pd.DataFrame:
    """guid, label, prediction, p_<class>... (and gate) for the items evaluated: the run's val
    predictions; with `data`, its labelled items (or those of labels_file), predicted as predict
    does; with labels_file alone, those items of the run's own data."""
    if labels_file is None and data is None:
        return val_predictions(Path(run_dir))
    predictions = predict(run_dir, data, split="all", cache=cache, show_progress=False)
    table = rundir.predictions_table(predictions.guids, predictions.labels, predictions.probabilities,
                                     predictions.class_names, predictions.gate).to_pandas()
    table.insert(1, "text", predictions.texts)
    if labels_file is None:
        wanted = {g: label for g, label in zip(predictions.guids, predictions.labels) if label is not None}
        if not wanted:
            raise ConfigError(f"--data {data}: no labelled items (train.txt lists none); give --labels FILE")
    else:
        wanted = {guid: label for guid, label, _ in read_label_file(Path(labels_file), labelled=True)}
    missing = sorted(set(wanted) - set(table["guid"]))
    if missing:
        where = f"--data {data}" if data else "the run's cache"
        raise ConfigError(f"{labels_file}: {len(missing)} guids are not in {where} "
                          f"(first: {', '.join(missing[:5])}){'' if data else '; pass their data with --data'}")
    table = table[table["guid"].isin(wanted)].copy()
    table["label"] = table["guid"].map(wanted)
    return table.reset_index(drop=True)


def val_predictions(run_dir: Path) -> pd.DataFrame:
    """A run's val predictions; a cross-validation's are its folds' (every labelled item once)."""
    folds = sorted(run_dir.glob("fold-*/" + rundir.VAL_PREDICTIONS))
    if rundir.read_json(run_dir / rundir.CONFIG).get("kind") == "cross-validation" and folds:
        return pd.concat([pd.read_parquet(f) for f in folds], ignore_index=True)
    return pd.read_parquet(run_dir / rundir.VAL_PREDICTIONS)


def own_posts(config: dict) -> pd.DataFrame | None:
    """guid -> text (with image path and flags where the cache has images) of the data a run was
    trained on, from its config; None for a cache that is gone or holds no posts."""
    try:
        manifest = read_manifest(Path(config["cache"]))
    except (KeyError, FileNotFoundError, CacheError):
        return None
    columns = {"guid": manifest.guids, "text": manifest.column("text")}
    if "image_path" in manifest.table.column_names:
        columns.update(image_path=manifest.column("image_path"), flags=manifest.column("flags"))
    return pd.DataFrame(columns).set_index("guid")


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


def averaged(first: pd.DataFrame, others: list[pd.DataFrame]) -> pd.DataFrame:
    """The runs' probabilities averaged item by item (matched by guid), and the prediction they give:
    of cross-validation runs, the out-of-fold estimate of their ensemble."""
    columns = [c for c in first.columns if c.startswith("p_")]
    table = first.drop(columns=[c for c in ("gate",) if c in first.columns]).set_index("guid")
    for other in others:
        other = other.set_index("guid")
        if set(other.index) != set(table.index) or [c for c in other.columns if c.startswith("p_")] != columns:
            raise ConfigError("--ensemble: the runs differ in their items or classes; only runs of one cache and "
                              "label set (and, for cross-validations, one set of folds) can be averaged")
        table[columns] += other.loc[table.index, columns].to_numpy()
    table[columns] /= 1 + len(others)
    table["prediction"] = [c.removeprefix("p_") for c in table[columns].idxmax(axis=1)]
    return table.reset_index()


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
    own_val = cfg.labels is None and cfg.data is None
    config = rundir.run_config(cfg.run)  # a run directory, or a one-line error saying what it is instead
    if own_val and task_of_metrics(rundir.read_json(Path(cfg.run) / rundir.METRICS)).name == "regression":
        return regression_report(cfg)
    # New data is extracted once, into the evaluated run's predict cache, for the unimodal runs too.
    shared_cache = Path(cfg.run) / rundir.PREDICT_CACHE if cfg.data else None
    table = run_predictions(cfg.run, cfg.labels, cfg.data, shared_cache)
    if cfg.ensemble:
        table = averaged(table, [run_predictions(r, cfg.labels, cfg.data, shared_cache) for r in cfg.ensemble])
    class_names = [c.removeprefix("p_") for c in table.columns if c.startswith("p_")]
    index = {name: i for i, name in enumerate(class_names)}
    metrics = classification_metrics(table["label"].map(index).to_numpy(),
                                     table["prediction"].map(index).to_numpy(), class_names)
    out = Path(cfg.out) if cfg.out else default_output(cfg.run, cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    if "text" not in table.columns:  # the run's val predictions carry no texts
        posts = own_posts(config)
        table.insert(1, "text", table["guid"].map(posts["text"]) if posts is not None else "")
    wrong = most_confident_mistakes(table)
    wrong.to_csv(out / "bad_cases.csv", index=False)
    errors = wrong.groupby(["label", "prediction"]).size().sort_values(ascending=False)
    report = {
        "metrics": metrics,
        "errors by type": {f"{t} -> {p}": int(n) for (t, p), n in errors.items()},
        "bad cases": str(out / "bad_cases.csv"),
    }
    if cfg.text_run and cfg.image_run:
        report["agreement"] = agreement(table, run_predictions(cfg.text_run, cfg.labels, cfg.data, shared_cache),
                                        run_predictions(cfg.image_run, cfg.labels, cfg.data, shared_cache))
    if "gate" in table.columns:
        report["gate"] = gate_statistics(table)
    rundir.write_json(out / "evaluation.json", report)
    return report


def most_confident_mistakes(table: pd.DataFrame) -> pd.DataFrame:
    """The wrongly predicted rows with their confidence (the largest probability), most confident first."""
    wrong = table[table["prediction"] != table["label"]].copy()
    wrong["confidence"] = wrong[[c for c in table.columns if c.startswith("p_")]].max(axis=1)
    return wrong.sort_values("confidence", ascending=False)


def default_output(run_dir: Path, data: Path | None) -> Path:
    """RUN/evaluation for the run's own data; new data's beside it, named after the data."""
    if data is None:
        return Path(run_dir) / rundir.EVALUATION_DIR
    return Path(run_dir) / f"{rundir.EVALUATION_DIR}-{data_tag(data)}"


def regression_report(cfg: EvaluateConfig) -> dict:
    """Regression runs: the field's metrics on the validation predictions, and the largest errors."""
    table = val_predictions(Path(cfg.run))
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / rundir.EVALUATION_DIR
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
