"""The `msa` command line: each command parses options into a stage config and runs it.

Options come from the stage configs' fields (msa/cli_options.py): their defaults, choices
and help are stated once, in msa/core/config.py. Every command takes `--config FILE`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from msa import __version__
from msa.cli_options import Settings, config_option, from_options, one_line_errors, with_options
from msa.core.config import (
    CaptionConfig,
    ConfigError,
    EvaluateConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    ReportConfig,
    SearchKind,
    SweepBackend,
    SweepConfig,
    TrainHeadConfig,
    default,
    from_record,
)
from msa.core.progress import console

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(help=__doc__.split("\n")[0], no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings=HELP)
cache_app = typer.Typer(help="Inspect and maintain a feature cache.", no_args_is_help=True, context_settings=HELP)
app.add_typer(cache_app, name="cache")
CACHE = typer.Option(default(ExtractConfig, "cache"), help="Cache directory.")
PROGRESS = typer.Option(True, metavar="", help="Show progress bars.")
OVERWRITE = typer.Option(False, "--overwrite", metavar="", help="Replace what --out holds (an msa run or file only).")
AS_JSON = typer.Option(False, "--json", metavar="",
                       help="Print the results as one JSON object on stdout (logs stay on stderr).")


def results(as_json: bool, data: dict, lines: list[str]) -> None:
    """Results on stdout, for scripts (progress, tables and logs go to stderr): one JSON object
    with --json, else lines of text; `msa --quiet` leaves only these."""
    if as_json:
        typer.echo(json.dumps(data, default=str))
    else:
        for line in lines:
            typer.echo(line)


def head_names() -> tuple[str, ...]:
    from msa.models.registry import HEADS

    return tuple(sorted(HEADS))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"msa {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                 help="Print the version."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="",
                               help="Print errors and results only (no progress, no tables)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Show the traceback of every error."),
) -> None:
    """msa: a feature-caching, two-stage pipeline for multimodal sentiment analysis."""
    console.quiet = quiet
    Settings.verbose = verbose


@app.command()
@one_line_errors
@with_options(ExtractConfig)
def extract(config: Path = config_option(), progress: bool = PROGRESS, as_json: bool = AS_JSON, **options) -> None:
    """Encode every item of an MVSA data set once and cache the features (resumable)."""
    from msa.stages import extract as stage

    result = stage.run(from_options(ExtractConfig, options), show_progress=progress)
    for table in stage.summary_tables(result):
        console.print(table)
    cache = Path(options["cache"]).resolve()
    results(as_json, {"cache": str(cache), "items": result.report.items_read,
                      "bad_items": len(result.report.bad_items),
                      "feature_sets": {m: {"name": r.name, "status": r.status, "rows_encoded": r.encoded_rows,
                                           "path": str(r.path)} for m, r in result.feature_sets.items()}},
            [f"cache: {cache}", *(f"{m}: {r.name}" for m, r in result.feature_sets.items())])
    busy = [r.name for r in result.feature_sets.values() if r.status == "busy"]
    if busy:  # exit 3: not everything asked for is in the cache yet
        console.print(f"[yellow]not extracted, another process is writing: {', '.join(busy)}; rerun when it is "
                      "done[/yellow]")
        raise typer.Exit(code=3)


@app.command()
@one_line_errors
@with_options(CaptionConfig)
def caption(config: Path = config_option(), progress: bool = PROGRESS, **options) -> None:
    """Caption every image once with BLIP into the cache (resumable: captioned images are skipped)."""
    from msa.stages import caption as stage

    result = stage.run(from_options(CaptionConfig, options), show_progress=progress)
    console.print(stage.summary_table(result))
    console.print(f"captions: {result.path}")


@app.command("import-features")
@one_line_errors
def import_features(
    file: Path = typer.Argument(..., help="Features file: MMSA's aligned_50.pkl / unaligned_50.pkl, a MultiBench "
                                          "pickle (train/valid/test, modality arrays, labels, id), or .npz / .h5."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory to create."),
    config: Path = config_option(),
) -> None:
    """Import pre-extracted sequence features (CMU-MOSI/MOSEI) as a cache for the stage 2 heads."""
    from msa.stages import import_features as stage

    result = stage.run(file, cache)
    console.print(stage.summary_table(result))
    console.print(f"cache: {cache.resolve()} ({', '.join(p.name for p in result.feature_sets.values())})")


@cache_app.command("ls")
@one_line_errors
def cache_ls(
    cache: Path = CACHE,
    as_json: bool = typer.Option(False, "--json", metavar="",
                                 help="One JSON document (manifest, feature files, caption sets)."),
    config: Path = config_option(),
) -> None:
    """List the manifest, every feature file and caption set of a cache, on stdout, one per line
    (tab-separated). Status: complete (current), stale (extracted for another manifest), partial
    (interrupted; extract resumes it), damaged (`msa cache rm` it and extract again)."""
    from msa.cache.maintenance import listing

    found = listing(cache)
    if as_json:
        typer.echo(json.dumps(found, indent=2, default=str))
        return
    manifest = found["manifest"]
    typer.echo(f"manifest {manifest['id']}: {manifest['items']} items from {manifest['data_dir']}"
               if "id" in manifest else f"manifest: {manifest['problem']}")
    for row in found["feature_files"]:
        typer.echo("\t".join([row["file"], row["status"], row.get("rows", "-"), f"{row.get('size_mb', '-')} MB"]))
    for row in found["caption_sets"]:
        typer.echo("\t".join([row["name"], row["status"], f"{row.get('images', '-')} images", row.get("model", "-")]))


@cache_app.command("rm")
@one_line_errors
def cache_rm(names: list[str] = typer.Argument(..., help="Feature or caption set names (from `msa cache ls`)."),
             cache: Path = CACHE, config: Path = config_option()) -> None:
    """Remove feature or caption sets, with their partial and set-aside files."""
    from msa.cache.maintenance import remove

    for name in names:
        for path in remove(cache, name):
            console.print(f"removed {path}")


@cache_app.command("gc")
@one_line_errors
def cache_gc(cache: Path = CACHE,
             dry_run: bool = typer.Option(False, "--dry-run", metavar="", help="Only list what would be removed."),
             config: Path = config_option()) -> None:
    """Remove what no run can use: partial sets nobody is writing, damaged and stale sets, leftovers."""
    from msa.cache.maintenance import collect

    found = collect(cache, dry_run)
    verb = "would remove" if dry_run else "removed"
    for finding in found:
        console.print(f"{verb} {finding.path}: {finding.reason}", soft_wrap=True)
    console.print(f"{len(found)} files {verb}" if found else "nothing to remove")


@cache_app.command("verify")
@one_line_errors
def cache_verify(names: list[str] = typer.Argument(None, help="Sets to check (default: every set)."),
                 cache: Path = CACHE, config: Path = config_option()) -> None:
    """Read every byte of the sets back against their checksums; exit 1 if any is damaged."""
    from msa.cache.maintenance import verify

    results = verify(cache, tuple(names or ()))
    for finding in results:
        ok = finding.reason == "ok"
        console.print(f"{'[green]ok[/green]' if ok else '[red]DAMAGED[/red]'} {finding.path.name}"
                      + ("" if ok else f": {finding.reason}"), soft_wrap=True)
    damaged = [f for f in results if f.reason != "ok"]
    if damaged:
        console.print(f"{len(damaged)} of {len(results)} sets damaged: remove them with `msa cache rm NAME` and "
                      "rerun `msa extract` (or `msa caption`) to make them again")
        raise typer.Exit(code=1)
    console.print(f"{len(results)} sets verified")


@cache_app.command("info")
@one_line_errors
def cache_info(name: str = typer.Argument(..., help="Feature set name (from `msa cache ls`, without .h5)."),
               cache: Path = CACHE, config: Path = config_option()) -> None:
    """Show one feature set's fingerprint and shapes as JSON."""
    from msa.cache.features import find_feature_set

    feature_set = find_feature_set(cache, name.removesuffix(".h5"))
    recorded = feature_set.notes.get("extract_config", {})
    # The fingerprint says "local" for a model on disk (its content digest beside it): where it was read from
    model = {"text": recorded.get("text_model"), "image": recorded.get("image_model")}.get(
        feature_set.fingerprint.get("modality"), feature_set.fingerprint.get("model"))
    typer.echo(json.dumps({"name": feature_set.name, "rows": len(feature_set.guids), "model": model,
                           "shapes": feature_set.shapes, "fingerprint": feature_set.fingerprint}, indent=2))


@cache_app.command("merge")
@one_line_errors
def cache_merge(name: str = typer.Argument(..., help="Feature set name whose shards to join."),
                cache: Path = CACHE, config: Path = config_option()) -> None:
    """Join the shard files written by `msa extract --shard i/n` into one feature set."""
    from msa.cache.maintenance import merge_shards

    console.print(f"merged: {merge_shards(cache, name)}")


@app.command("train-head")
@one_line_errors
@with_options(TrainHeadConfig, choices={"fusion": head_names()})
def train_head_command(config: Path = config_option(), overwrite: bool = OVERWRITE, as_json: bool = AS_JSON,
                       progress: bool = PROGRESS, **options) -> None:
    """Train one fusion head on cached features; writes a run directory."""
    from msa.stages import train_head
    from msa.training.tasks import task_of_metrics

    result = train_head.run(from_options(TrainHeadConfig, options), log=console.print, overwrite=overwrite,
                            show_progress=progress)
    task = task_of_metrics(result.metrics)
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    lines = [f"{task.summary(result.metrics)}  (best epoch {result.best_epoch}, {result.seconds:.1f} s)",
             *([task.baseline_summary(result.metrics)] if task.baseline_summary(result.metrics) else []),
             f"run: {result.run_dir}"]
    results(as_json, {"run": str(result.run_dir), "metrics": result.metrics, "warnings": result.warnings}, lines)


@app.command()
@one_line_errors
@with_options(TrainHeadConfig, skip=("fusion", "seed", "out"))
def sweep(
    fusion: str = typer.Option(",".join(default(SweepConfig, "fusions")),
                               help=f"Heads, comma-separated, of: {', '.join(head_names())}."),
    seeds: str = typer.Option(",".join(map(str, default(SweepConfig, "seeds"))), help="Seeds, comma-separated."),
    grid: list[str] = typer.Option(None, help="FIELD=V1,V2 over any train-head option; repeat for more."),
    out: Path = typer.Option(default(SweepConfig, "out"), help="Sweep directory (one run dir per run); a sweep "
                                                               "into an earlier sweep's resumes it."),
    workers: int = typer.Option(default(SweepConfig, "workers"),
                                help="Worker processes sharing the CPU threads (2 helps small heads on 2 cores)."),
    backend: SweepBackend = typer.Option(default(SweepConfig, "backend"),
                                         help="local: worker processes here; ray: tasks on a Ray cluster "
                                              "(pip install \"msa\\[ray]\"), --workers of them."),
    address: str = typer.Option(None, help="The Ray cluster (auto, ray://HOST:10001); default: start one here."),
    search: SearchKind = typer.Option(default(SweepConfig, "search"),
                                      help="grid: every head x seed x grid value; optuna: --trials drawn by TPE "
                                           "(the first seed), pruned by the median of earlier trials."),
    trials: int = typer.Option(default(SweepConfig, "trials"), help="optuna: trials to finish (pruned ones count)."),
    space: Path = typer.Option(None, help="optuna: search space file (TOML/YAML/JSON), per option {low, high[, "
                                          "log]} or {choices}; default: lr, weight_decay, dropout, hidden."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="",
                                   help="Retrain finished runs whose options changed."),
    config: Path = config_option(),
    progress: bool = PROGRESS,
    as_json: bool = AS_JSON,
    **options,
) -> None:
    """Train every head x seed x grid combination on shared in-memory features; resumable."""
    from msa.core import rundir
    from msa.stages import sweep as stage

    names = [v.strip() for v in fusion.split(",") if v.strip()]
    cfg = SweepConfig(base=from_options(TrainHeadConfig, options), out=out, fusions=tuple(names),
                      seeds=stage.parse_seeds(seeds), grid=stage.parse_grid(grid or []),
                      workers=workers, backend=backend, address=address, search=search, trials=trials, space=space)
    if cfg.search == "optuna":
        from msa.stages import search as searching

        table = searching.run(cfg, show_progress=progress)
    else:
        table = stage.run(cfg, show_progress=progress, overwrite=overwrite)
    keys = list(cfg.grid) if cfg.search == "grid" else list(searching.space_of(cfg))
    console.print(stage.leaderboard_table(stage.leaderboard(table, keys), keys))
    summary = rundir.read_json(out / rundir.LEADERBOARD_JSON)
    results(as_json, {"sweep": str(out), "runs": len(table), **summary},
            [f"results: {out / 'results.csv'} ({len(table)} runs)", f"leaderboard: {out / rundir.LEADERBOARD_CSV}",
             f"best run: {summary['best_run']}"])


@app.command()
@one_line_errors
@with_options(FinetuneConfig, optional=("data",), choices={"fusion": head_names()})
def finetune(
    resume: Path = typer.Option(None, help="Continue this run exactly where it stopped (its options are kept)."),
    overwrite: bool = OVERWRITE,
    config: Path = config_option(),
    progress: bool = PROGRESS,
    as_json: bool = AS_JSON,
    **options,
) -> None:
    """Fine-tune the encoders' tops and a fusion head end to end on raw data (checkpointed every epoch)."""
    from msa.core import rundir
    from msa.stages import finetune as stage
    from msa.training.tasks import task_of_metrics

    if resume:
        cfg = from_record(FinetuneConfig, rundir.read_json(resume / rundir.CONFIG), out=resume)
    elif options.get("data") is None:
        raise ConfigError("--data is needed (or --resume RUN)")
    else:
        cfg = from_options(FinetuneConfig, options)
    run_dir = stage.run(cfg, resume=bool(resume), show_progress=progress, log=console.print,
                        overwrite=overwrite)
    metrics = rundir.read_json(run_dir / rundir.METRICS)
    results(as_json, {"run": str(run_dir), "metrics": metrics},
            [f"{task_of_metrics(metrics).summary(metrics)}  (best epoch {metrics['best_epoch']})", f"run: {run_dir}"])


@app.command()
@one_line_errors
@with_options(PredictConfig)
def predict(config: Path = config_option(), overwrite: bool = OVERWRITE, progress: bool = PROGRESS,
            as_json: bool = AS_JSON, **options) -> None:
    """Write guid,tag predictions of a run (with --probs, the class probabilities too), extracting new
    data with the run's encoders."""
    from msa.stages import predict as stage

    cfg = from_options(PredictConfig, options)
    if cfg.text is not None or cfg.image is not None:  # one post, from the command line
        from msa.api import load_run

        if cfg.data or cfg.ensemble:
            raise ConfigError("--text/--image predict one post: leave out --data and --ensemble")
        post = load_run(cfg.run).predict([cfg.text or ""], [cfg.image], cfg.device, show_progress=progress)[0]
        typer.echo(json.dumps(post))
        return
    path, predictions = stage.run(cfg, show_progress=progress, overwrite=overwrite)
    if predictions.scores is not None:
        results(as_json, {"file": str(path), "items": len(predictions.guids),
                          "mean_score": float(predictions.scores.mean())},
                [f"{len(predictions.guids)} predicted scores (mean {predictions.scores.mean():.3f}): {path}"])
        return
    counts = {c: predictions.predicted.count(c) for c in predictions.class_names}
    results(as_json, {"file": str(path), "items": len(predictions.guids), "counts": counts},
            [f"{len(predictions.guids)} predictions ({', '.join(f'{k} {v}' for k, v in counts.items())}): {path}"])


@app.command()
@one_line_errors
@with_options(EvaluateConfig)
def evaluate(config: Path = config_option(), as_json: bool = AS_JSON, **options) -> None:
    """Metrics, bad cases, modality agreement and gate statistics of a run."""
    from msa.stages import evaluate as stage

    report = stage.run(from_options(EvaluateConfig, options))
    console.print(stage.report_tables(report))
    results(as_json, report, [])


@app.command()
@one_line_errors
@with_options(ReportConfig, skip=("target",))
def report(target: Path = typer.Argument(..., help="A run or a sweep directory."), config: Path = config_option(),
           as_json: bool = AS_JSON, **options) -> None:
    """One self-contained HTML page of a run or a sweep: leaderboard, curves, confusion, worst posts."""
    from msa.stages import report as stage

    page = stage.run(from_options(ReportConfig, options, target=target))
    results(as_json, {"report": str(page)}, [f"report: {page}"])


@app.command()
@one_line_errors
def demo(
    out: Path = typer.Option(Path("demo"), help="Where the generated data, models, cache and runs go."),
    progress: bool = PROGRESS,
    config: Path = config_option(),
) -> None:
    """Generate a small data set and tiny random encoders, then run the pipeline on them."""
    from msa.stages import demo as stage

    stage.run(out, show_progress=progress)


@app.command("reference", hidden=True)
def reference() -> None:
    """Print the command reference in Markdown (docs/cli.md's is this output)."""
    from msa.cli_reference import markdown

    typer.echo(markdown(app), nl=False)


if __name__ == "__main__":
    app()
