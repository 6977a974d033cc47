"""`msa report`: one self-contained HTML file for a run or a sweep, to look at rather than read.

Everything is inside the file (images as data URIs, a few lines of script to sort tables), so
it opens offline, from a mail or a CI artefact. A sweep's page: its leaderboard and every run's
row, sortable by any column; then per run: the curves, the confusion matrix, precision /
recall / F1 by class, the GMU gate and the text/image agreement where `msa evaluate` computed
them, and the posts it got most confidently wrong with their picture, text, gold and predicted
label and probabilities. A regression run shows predicted against true scores and the field's
metrics instead.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from msa.core import rundir
from msa.core.config import ReportConfig
from msa.data.mvsa import check_image
from msa.stages import evaluate
from msa.training.tasks import TASKS, task_of_metrics

THUMBNAIL = 96  # pixels, the longer side of a bad case's picture


def run(cfg: ReportConfig) -> Path:
    target = Path(cfg.target)
    if (target / rundir.LEADERBOARD_JSON).is_file():
        summary = rundir.read_json(target / rundir.LEADERBOARD_JSON)
        results = pd.read_csv(target / "results.csv")
        runs = [target / name for name in results["run"] if rundir.is_finished(target / name)]
        title = f"sweep {target.name}"
        head = leaderboard_section(summary, results)
    else:
        rundir.run_config(target)  # a run, or a one-line error saying what the folder is
        if not rundir.is_finished(target):
            raise rundir.RunDirError(f"{target}: the run is unfinished (no {rundir.METRICS}); finish it first")
        runs, title, head = [target], f"run {target.name}", ""
    best = Path(summary["best_run"]).name if head else target.name
    sections = [run_section(r, cfg.worst, open_=r.name == best) for r in runs]
    out = Path(cfg.out) if cfg.out else target / rundir.REPORT
    page = PAGE.format(title=html.escape(title), style=STYLE, script=SCRIPT, head=head, body="\n".join(sections))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def leaderboard_section(summary: dict, results: pd.DataFrame) -> str:
    task = TASKS[summary["task"]]
    board = pd.DataFrame(summary["leaderboard"])
    metrics = [m for m, _ in task.leaderboard]
    keys = [c for c in board.columns if c not in {"task", "runs"} and not c.endswith(("_mean", "_std"))]
    rows = []
    for _, row in board.iterrows():
        cells = [cell(row[k]) for k in keys]
        cells += [cell(row[f"{m}_mean"], number(row[f"{m}_mean"]) + ("" if pd.isna(row.get(f"{m}_std")) else
                                                                    f" ± {number(row[f'{m}_std'])}"))
                  for m in metrics]
        cells += [cell(row["vs_baseline_mean"], signed(row["vs_baseline_mean"])), cell(row["runs"])]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = [*keys, *(title for _, title in task.leaderboard), "vs linear baseline", "runs"]
    figures = [c for c in task.results if c in results.columns]
    run_keys = [c for c in results.columns if c not in {"task", "run", "vs_baseline", *figures}]
    run_rows = []
    for _, row in results.iterrows():
        cells = [f'<td data-value="{html.escape(row["run"])}"><a href="#run-{html.escape(row["run"])}">'
                 f'{html.escape(row["run"])}</a></td>']
        cells += [cell(row[k]) for k in run_keys] + [cell(row[m]) for m in figures]
        cells.append(cell(row["vs_baseline"], signed(row["vs_baseline"])))
        run_rows.append(f'<tr data-run="{html.escape(row["run"])}">{"".join(cells)}</tr>')
    return (f"<h2>Leaderboard</h2><p>val, mean ± std over seeds, best first; click a column to sort. Best run: "
            f"<a href=\"#run-{html.escape(Path(summary['best_run']).name)}\">{html.escape(summary['best_run'])}</a>"
            f"</p>{table(header, rows, 'leaderboard')}"
            f"<h2>Runs</h2>{table(['run', *run_keys, *figures, 'vs_baseline'], run_rows, 'runs')}")


def run_section(run_dir: Path, worst: int, open_: bool) -> str:
    metrics = rundir.read_json(run_dir / rundir.METRICS)
    task = task_of_metrics(metrics)
    config = rundir.read_json(run_dir / rundir.CONFIG)
    predictions = evaluate.val_predictions(run_dir)
    parts = [f"<p>{html.escape(summary_line(config, metrics, task))}</p>"]
    images = [png_tag(run_dir / name, alt) for name, alt in ((rundir.CURVES, "curves"),
                                                            (rundir.CONFUSION, "confusion matrix"))]
    if task.is_regression:
        parts.append(regression_part(metrics, predictions, worst))
    else:
        parts.append('<div class="figures">' + "".join(i for i in images if i) + "</div>")
        parts.append(per_class_table(metrics))
        parts.append(explanations(run_dir, predictions))
        parts.append(bad_cases(predictions, evaluate.own_posts(config), worst))
    name = html.escape(run_dir.name)
    return (f'<details id="run-{name}" class="run"{" open" if open_ else ""}><summary>{name}: '
            f"{html.escape(config.get('fusion', config.get('kind', '')))}</summary>{''.join(parts)}</details>")


def summary_line(config: dict, metrics: dict, task) -> str:
    key, title = task.leaderboard[0]
    line = f"{config.get('fusion', '')} head, val {title} {number(metrics.get(key))}"
    if task.baseline_summary(metrics):
        line += f"; {task.baseline_summary(metrics)}"
    return line + f"; best epoch {metrics.get('best_epoch')}, {number(metrics.get('train_seconds'), 1)} s"


def per_class_table(metrics: dict) -> str:
    per_class = metrics.get("per_class") or {}
    rows = [f"<tr>{cell(name)}{cell(v['precision'])}{cell(v['recall'])}{cell(v['f1'])}{cell(v['support'])}</tr>"
            for name, v in per_class.items()]
    return "<h3>By class</h3>" + table(["class", "precision", "recall", "F1", "support"], rows) if rows else ""


def explanations(run_dir: Path, predictions: pd.DataFrame) -> str:
    """The GMU gate by class and outcome; the text/image agreement of `msa evaluate`, if it ran."""
    parts = []
    if "gate" in predictions.columns:
        stats = evaluate.gate_statistics(predictions)
        rows = [f"<tr>{cell(group)}{cell(name)}{cell(v['mean'])}{cell(v['std'])}{cell(v['n'])}</tr>"
                for group, values in stats.items() for name, v in values.items()]
        parts.append("<h3>GMU gate (weight of the text)</h3>" + table(["by", "group", "mean", "std", "n"], rows))
    saved = run_dir / rundir.EVALUATION_DIR / "evaluation.json"
    if saved.is_file() and "agreement" in (report := rundir.read_json(saved)):
        rows = [f"<tr>{cell(k)}{cell(v if not isinstance(v, dict) else json.dumps(v))}</tr>"
                for k, v in report["agreement"].items()]
        parts.append("<h3>Text and image agreement (msa evaluate)</h3>" + table(["", "value"], rows))
    return "".join(parts)


def bad_cases(predictions: pd.DataFrame, posts: pd.DataFrame | None, worst: int) -> str:
    """The posts predicted wrong with the highest confidence."""
    probabilities = [c for c in predictions.columns if c.startswith("p_")]
    wrong = evaluate.most_confident_mistakes(predictions).head(worst)
    rows = []
    for _, row in wrong.iterrows():
        post = posts.loc[row["guid"]] if posts is not None and row["guid"] in posts.index else None
        picture = thumbnail(post) if post is not None and "image_path" in post else placeholder()
        text = post["text"] if post is not None else ""
        shares = " ".join(f"{c.removeprefix('p_')} {row[c]:.2f}" for c in probabilities)
        rows.append(f'<tr class="bad-case">{cell(row["guid"])}<td>{picture}</td>{cell(text)}{cell(row["label"])}'
                    f'{cell(row["prediction"])}{cell(shares)}</tr>')
    if not rows:
        return "<h3>Worst posts</h3><p>none: every val post is predicted right</p>"
    return "<h3>Worst posts (wrong, most confident first)</h3>" + table(
        ["guid", "image", "text", "gold", "predicted", "probabilities"], rows)


def thumbnail(post: pd.Series) -> str:
    """The post's picture, small, as a JPEG data URI; a grey square where it is missing or bad
    (decoded only after the same checks extract made: no bomb, nothing outside the data)."""
    from PIL import Image

    flags = set(post.get("flags") if post.get("flags") is not None else [])
    path = Path(post["image_path"])
    if any(f.endswith("_image") for f in flags) or check_image(path):
        return placeholder()
    with Image.open(path) as image:
        image.draft("RGB", (THUMBNAIL, THUMBNAIL))
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    return image_tag(buffer.getvalue(), "image/jpeg", "post image", "thumb")


def placeholder() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200)).save(buffer, format="PNG")
    return image_tag(buffer.getvalue(), "image/png", "no image", "thumb")


def regression_part(metrics: dict, predictions: pd.DataFrame, worst: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.scatter(predictions["score"], predictions["prediction"], s=8, alpha=0.6)
    axis.plot([-3, 3], [-3, 3], color="grey", linewidth=1)
    axis.set(xlabel="true score", ylabel="predicted score", xlim=(-3.2, 3.2), ylim=(-3.2, 3.2),
             title="val: predicted against true")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    names = {"mae": "MAE", "corr": "Corr", "acc2": "Acc-2", "acc7": "Acc-7"}
    rows = [f"<tr>{cell(title)}{cell(metrics.get(key))}</tr>" for key, title in names.items()]
    predictions = predictions.assign(error=(predictions["prediction"] - predictions["score"]).abs())
    errors = [f"<tr>{cell(r['guid'])}{cell(r['score'])}{cell(r['prediction'])}{cell(r['error'])}</tr>"
              for _, r in predictions.sort_values("error", ascending=False).head(worst).iterrows()]
    return (f'<div class="figures">{image_tag(buffer.getvalue(), "image/png", "scatter", "figure")}</div>'
            + table(["metric", "val"], rows) + "<h3>Largest errors</h3>"
            + table(["guid", "true", "predicted", "|error|"], errors))


def png_tag(path: Path, alt: str) -> str:
    return image_tag(path.read_bytes(), "image/png", alt, "figure") if path.is_file() else ""


def image_tag(data: bytes, mime: str, alt: str, kind: str) -> str:
    return f'<img class="{kind}" alt="{alt}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def table(header: list[str], rows: list[str], name: str = "") -> str:
    heads = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    return (f'<table class="sortable" data-name="{name}"><thead><tr>{heads}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def cell(value, shown: str | None = None) -> str:
    """A cell whose data-value sorts (numbers as numbers) and whose text is `shown` or the value."""
    if isinstance(value, float | np.floating) and not np.isnan(value):
        sort, text = repr(float(value)), number(value)
    elif isinstance(value, int | np.integer):
        sort, text = str(value), str(value)
    else:
        sort = text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
    return f'<td data-value="{html.escape(sort)}">{html.escape(shown if shown is not None else text)}</td>'


def number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return "-"
    value = float(value)
    return f"{value:.{digits}g}" if value != 0 and abs(value) < 1e-3 else f"{value:.{digits}f}"


def signed(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:+.4f}"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td { max-width: 420px; }
details.run { border: 1px solid #ccc; border-radius: 4px; margin: .6em 0; padding: .3em .8em; }
details.run > summary { font-weight: 600; cursor: pointer; }
.figures img.figure { max-width: 560px; margin-right: 1em; }
img.thumb { width: 96px; height: auto; }
"""

SCRIPT = """
window.addEventListener("error", function (event) { document.body.dataset.scriptError = event.message; });
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
  var descending = !th.classList.contains("desc");
  table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
  th.classList.add(descending ? "desc" : "asc");
  var rows = Array.from(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
    var nx = parseFloat(x), ny = parseFloat(y);
    var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return descending ? -order : order;
  });
  rows.forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () { sortBy(th); });
});
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  document.body.dataset.imagesLoaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.images = images.length;
  document.body.dataset.ready = "1";
});
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>msa report: {title}</title>
<style>{style}</style></head>
<body><h1>msa report: {title}</h1>
{head}
<h2>Runs in detail</h2>
{body}
<script>{script}</script>
</body></html>
"""
