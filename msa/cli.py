"""The `msa` command line: each command parses options into a stage config and runs it."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import typer
from rich.table import Table

from msa.pipeline.config import (
    CaptionConfig,
    EvaluateConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    SweepConfig,
    TrainHeadConfig,
    default,
    from_record,
)
from msa.pipeline.progress import console

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
cache_app = typer.Typer(help="Inspect and maintain a feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _fail(err: Exception) -> None:
    """Known problems (bad data, a model that will not load) end with one clear line."""
    console.print(f"[red]error:[/red] {err}", soft_wrap=True)
    raise typer.Exit(code=2)


def _known_errors() -> tuple[type[Exception], ...]:
    from msa.cache.errors import CacheError
    from msa.models.text import EncoderLoadError
    from msa.pipeline.mvsa import DataError
    from msa.pipeline.rundir import RunDirError

    return DataError, EncoderLoadError, CacheError, RunDirError, FileNotFoundError, ValueError


def one_line_errors(command):
    """Turn the errors a user can fix into one line and exit code 2: our own error types, and a
    full disk (named with the file and the free space) wherever it strikes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from msa.cache.errors import NO_ROOM, write_error

        try:
            return command(*args, **kwargs)
        except _known_errors() as err:
            _fail(err)
        except OSError as err:
            if err.errno not in NO_ROOM:
                raise
            _fail(write_error(Path(err.filename or "."), err))

    return wrapper


@app.command()
@one_line_errors
def extract(
    data: Path = typer.Option(..., help="MVSA folder (train.txt, test_without_label.txt, data/)."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory for this data set."),
    text_model: str = typer.Option(default(ExtractConfig, "text_model"), help="HF hub id or local model directory."),
    max_len: int = typer.Option(default(ExtractConfig, "max_len"), help="Tokens kept per text."),
    pooling: str = typer.Option(default(ExtractConfig, "pooling"), help="Pooled text feature: mean | cls."),
    image_model: str = typer.Option(default(ExtractConfig, "image_model"), help="torchvision name or timm:NAME."),
    image_weights: str = typer.Option(None, help="Local state dict for the image model (no download)."),
    on_bad_image: str = typer.Option(default(ExtractConfig, "on_bad_image"), help="blank | skip | fail."),
    on_duplicate: str = typer.Option(default(ExtractConfig, "on_duplicate"),
                                     help="A guid listed twice: first-if-same (keep the first; conflicting labels "
                                          "stop) | first | error."),
    val_ratio: float = typer.Option(default(ExtractConfig, "val_ratio"), help="Validation share of labelled items."),
    split_seed: int = typer.Option(default(ExtractConfig, "split_seed"), help="Seed of the stratified split."),
    device: str = typer.Option(default(ExtractConfig, "device"), help="auto | cpu | cuda."),
    precision: str = typer.Option(default(ExtractConfig, "precision"),
                                  help="auto | fp32 | bf16 | fp16 (auto: reduced precision only where fast)."),
    compile: bool = typer.Option(default(ExtractConfig, "compile"),
                                 help="Always torch.compile the image encoder (auto from 1,000 images on CPU)."),
    batch_size: int = typer.Option(default(ExtractConfig, "batch_size")),
    limit: int = typer.Option(None, help="Only the first N listed items (a quick trial)."),
    shard: str = typer.Option(None, help="i/n: encode the i-th of n disjoint shares; join with `msa cache merge`."),
    modalities: str = typer.Option(",".join(default(ExtractConfig, "modalities")), help="Comma-separated."),
    text_source: str = typer.Option(default(ExtractConfig, "text_source"),
                                    help="raw | caption | raw+caption (post text <sep> caption); captions "
                                         "come from `msa caption`."),
    captions: str = typer.Option(None, help="Caption set to read (default: the one in the cache)."),
    text_split_layer: int = typer.Option(None, help="Also cache the hidden states entering the top K text "
                                                    "layers (for train-head --unfreeze-text-layers K)."),
    image_split_stage: int = typer.Option(None, help="Also cache the activation entering the last K image "
                                                     "stages (for train-head --unfreeze-image-stages K)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Encode every item of an MVSA data set once and cache the features (resumable)."""
    from msa.stages import extract as stage

    cfg = ExtractConfig(data=data, cache=cache, text_model=text_model, max_len=max_len, pooling=pooling,
                        image_model=image_model, image_weights=image_weights, on_bad_image=on_bad_image,
                        on_duplicate=on_duplicate, val_ratio=val_ratio, split_seed=split_seed, device=device,
                        precision=precision,
                        compile=compile, batch_size=batch_size, limit=limit, shard=shard,
                        modalities=_names(modalities), text_source=text_source, captions=captions,
                        text_split_layer=text_split_layer, image_split_stage=image_split_stage)
    result = stage.run(cfg, show_progress=progress)
    for table in stage.summary_tables(result):
        console.print(table)
    console.print(f"cache: {cache.resolve()}")
    busy = [r.name for r in result.feature_sets.values() if r.status == "busy"]
    if busy:  # exit 3: not everything asked for is in the cache yet
        console.print(f"[yellow]not extracted, another process is writing: {', '.join(busy)}; rerun when it is "
                      "done[/yellow]")
        raise typer.Exit(code=3)


def _c(field: str):
    return default(CaptionConfig, field)


@app.command()
@one_line_errors
def caption(
    data: Path = typer.Option(..., help="MVSA folder (train.txt, test_without_label.txt, data/)."),
    cache: Path = typer.Option(_c("cache"), help="Cache directory; captions go to CACHE/captions/."),
    backend: str = typer.Option(_c("backend"), help="transformers | lavis."),
    model: str = typer.Option(_c("model"), help="HF id or local BLIP directory; lavis: base_coco | large_coco."),
    batch_size: int = typer.Option(_c("batch_size")),
    num_beams: int = typer.Option(_c("num_beams"), help="1: greedy; more: beam search."),
    max_new_tokens: int = typer.Option(_c("max_new_tokens")),
    prompt: str = typer.Option(None, help='Text the caption continues, e.g. "a picture of" (not stored).'),
    device: str = typer.Option(_c("device"), help="auto | cpu | cuda."),
    precision: str = typer.Option(_c("precision"), help="auto | fp32 | bf16 | fp16 (auto: fp16 on CUDA)."),
    compile: bool = typer.Option(None, "--compile/--no-compile",
                                 help="torch.compile the vision encoder (default: from 200 images on CPU)."),
    lavis_python: str = typer.Option(None, help="Python of the environment lavis is installed in."),
    limit: int = typer.Option(None, help="Only the first N listed items (a quick trial)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Caption every image once with BLIP into the cache (resumable: captioned images are skipped)."""
    options = {k: v for k, v in locals().items() if k != "progress"}
    from msa.stages import caption as stage

    cfg = CaptionConfig(**options)
    result = stage.run(cfg, show_progress=progress)
    console.print(stage.summary_table(result))
    console.print(f"captions: {result.path}")


@app.command("import-features")
@one_line_errors
def import_features(
    file: Path = typer.Argument(..., help="MultiBench-style pickle: train/valid/test, modality arrays, labels, id."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory to create."),
) -> None:
    """Import pre-extracted sequence features (CMU-MOSI/MOSEI) as a cache for the stage 2 heads."""
    from msa.stages import import_features as stage

    result = stage.run(file, cache)
    console.print(stage.summary_table(result))
    console.print(f"cache: {cache.resolve()} ({', '.join(p.name for p in result.feature_sets.values())})")


@cache_app.command("ls")
@one_line_errors
def cache_ls(cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory.")) -> None:
    """List the manifest and every feature set in a cache, with sizes."""
    from msa.cache.captions import CaptionSet, is_finished, list_caption_sets
    from msa.cache.errors import CacheError
    from msa.cache.features import list_feature_files
    from msa.cache.fingerprint import slug
    from msa.cache.manifest import read_manifest

    try:
        manifest = read_manifest(cache)
        console.print(f"manifest {manifest.manifest_id}: {len(manifest)} items from {manifest.info['data_dir']}")
    except CacheError as err:  # the sets can still be listed, just not called current or stale
        manifest = None
        console.print(f"[red]manifest:[/red] {err}", soft_wrap=True)
    table = Table(caption="stale: extracted for an earlier manifest (other data or split)")
    for column in ("file", "status", "rows", "pooled", "tokens", "MB", "model"):
        table.add_column(column, overflow="fold")
    for row in list_feature_files(cache):
        fp = row.get("fingerprint", {})
        stale = manifest is not None and fp and fp.get("manifest_id") != manifest.manifest_id
        table.add_row(row["file"], f"{row['status']}, stale" if stale else row["status"], row.get("rows", ""),
                      str(row.get("pooled", "")), str(row.get("tokens", "")), str(row.get("size_mb", "")),
                      slug(str(fp.get("model", ""))))
    console.print(table)
    for name in list_caption_sets(cache):
        try:
            captions = CaptionSet.load(cache, name)
        except CacheError as err:
            console.print(f"[red]captions {name}:[/red] {err}", soft_wrap=True)
            continue
        state = "complete" if is_finished(cache, name) else "interrupted (resume with `msa caption`)"
        console.print(f"captions {name}: {len(captions.captions)} images, {state}, "
                      f"model {captions.fingerprint.get('model')}")


@cache_app.command("rm")
@one_line_errors
def cache_rm(
    names: list[str] = typer.Argument(..., help="Feature or caption set names (from `msa cache ls`)."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
) -> None:
    """Remove feature or caption sets, with their partial and set-aside files."""
    from msa.cache.maintenance import remove

    for name in names:
        for path in remove(cache, name):
            console.print(f"removed {path}")


@cache_app.command("gc")
@one_line_errors
def cache_gc(
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
) -> None:
    """Remove what no run can use: partial sets nobody is writing, damaged and stale sets, leftovers."""
    from msa.cache.maintenance import collect

    found = collect(cache, dry_run)
    verb = "would remove" if dry_run else "removed"
    for finding in found:
        console.print(f"{verb} {finding.path}: {finding.reason}", soft_wrap=True)
    console.print(f"{len(found)} files {verb}" if found else "nothing to remove")


@cache_app.command("verify")
@one_line_errors
def cache_verify(
    names: list[str] = typer.Argument(None, help="Sets to check (default: every set)."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
) -> None:
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
def cache_info(
    name: str = typer.Argument(..., help="Feature set name (from `msa cache ls`, without .h5)."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
) -> None:
    """Show one feature set's fingerprint and shapes as JSON."""
    from msa.cache.features import find_feature_set

    feature_set = find_feature_set(cache, name.removesuffix(".h5"))
    typer.echo(json.dumps({"name": feature_set.name, "rows": len(feature_set.guids),
                           "shapes": feature_set.shapes, "fingerprint": feature_set.fingerprint}, indent=2))


@cache_app.command("merge")
@one_line_errors
def cache_merge(
    name: str = typer.Argument(..., help="Feature set name whose shards to join."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
) -> None:
    """Join the shard files written by `msa extract --shard i/n` into one feature set."""
    from msa.cache.features import merge_shards

    path = merge_shards(cache, name)
    console.print(f"merged: {path}")


def _train_head_config(options: dict) -> TrainHeadConfig:
    """A TrainHeadConfig from a command's options, by name (comma lists become tuples)."""
    return from_record(TrainHeadConfig, options, features=_names(options.get("features")),
                       modalities=_names(options.get("modalities")),
                       class_weights=tuple(float(w) for w in _names(options.get("class_weights"))) or None)


def _names(csv: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (csv or "").split(",") if v.strip())


def _t(field: str):
    return default(TrainHeadConfig, field)


# Options shared by train-head and sweep (a sweep's base configuration), each declared once:
# name -> (type, option). `with_train_options` adds them to both commands.
TRAIN_OPTIONS = dict(
    cache=(Path, typer.Option(_t("cache"), help="Cache written by `msa extract`.")),
    features=(str, typer.Option(None, help="Feature set names, comma-separated (default: the one set per "
                                           "modality).")),
    modalities=(str, typer.Option(None, help="Modalities to use, comma-separated (default: all in the cache).")),
    task=(str, typer.Option(_t("task"), help="auto | classification | regression (auto: regression for float "
                                             "scores).")),
    epochs=(int, typer.Option(_t("epochs"))),
    batch_size=(int, typer.Option(None, help="Default: the head's own (128 pooled, 64 token-level, 32 sequence).")),
    lr=(float, typer.Option(_t("lr"))),
    weight_decay=(float, typer.Option(_t("weight_decay"))),
    warmup_ratio=(float, typer.Option(_t("warmup_ratio"), help="Share of steps warming up, then cosine decay.")),
    dropout=(float, typer.Option(_t("dropout"))),
    hidden=(int, typer.Option(_t("hidden"), help="Width of the head.")),
    loss=(str, typer.Option(None, help="ce | weighted-ce | focal; regression: mse | l1 | huber (default ce / l1).")),
    class_weights=(str, typer.Option(None, help="Comma-separated, in class order negative,neutral,positive "
                                                "(default for weighted losses: inverse train frequency).")),
    label_smoothing=(float, typer.Option(_t("label_smoothing"))),
    focal_gamma=(float, typer.Option(_t("focal_gamma"))),
    rdrop_alpha=(float, typer.Option(_t("rdrop_alpha"), help="R-Drop KL weight (0: off).")),
    modality_dropout=(float, typer.Option(_t("modality_dropout"), help="Per-sample chance of zeroing one modality.")),
    select=(str, typer.Option(None, help="macro_f1 | accuracy | loss; regression: mae | corr | loss (default "
                                         "macro_f1 / mae), on the val split.")),
    patience=(int, typer.Option(_t("patience"), help="Epochs without improvement before stopping.")),
    unfreeze_text_layers=(int, typer.Option(_t("unfreeze_text_layers"), help="Train the top K text layers on the "
                                            "hidden states cached by `extract --text-split-layer K`.")),
    unfreeze_image_stages=(int, typer.Option(_t("unfreeze_image_stages"), help="Train the last K image stages on "
                                             "the activations cached by `extract --image-split-stage K`.")),
    lr_encoder=(float, typer.Option(_t("lr_encoder"), help="Learning rate of unfrozen encoder layers.")),
    lr_fusion=(float, typer.Option(_t("lr_fusion"), help="Of the head's fusion layers, when something is "
                                                         "unfrozen.")),
    lr_head=(float, typer.Option(_t("lr_head"), help="Of the classifier, when something is unfrozen (else --lr).")),
    grad_accum=(int, typer.Option(_t("grad_accum"), help="Batches per optimizer step.")),
    sequence_encoder=(str, typer.Option(_t("sequence_encoder"), help="lstm | transformer, for sum-lstm, "
                                                                     "attention, seq-concat.")),
    output_scaling=(str, typer.Option(_t("output_scaling"), help="tanh | sigmoid: bounds regression scores to "
                                                                 "[-3, 3].")),
)


def with_train_options(command):
    """Give a command (taking **options) the TRAIN_OPTIONS as parameters, after its own."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in TRAIN_OPTIONS.items()]
    command.__signature__ = signature.replace(parameters=own + shared)
    return command


@app.command("train-head")
@with_train_options
@one_line_errors
def train_head_command(
    fusion: str = typer.Option(_t("fusion"), help="Fusion head: text-only, image-only, concat, late, early, "
                                                  "gmu, cross-attn, co-attn, aligned, hierarchical; sequence "
                                                  "heads (MOSI): sum-lstm, attention, seq-concat."),
    out: Path = typer.Option(None, help="Run directory (default runs/<fusion>-seed<seed>-<time>); must be new."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds (an msa run only)."),
    seed: int = typer.Option(_t("seed")),
    **options,
) -> None:
    """Train one fusion head on cached features; writes a run directory."""
    from msa.stages import train_head

    cfg = _train_head_config({**options, "fusion": fusion, "out": out, "seed": seed})
    result = train_head.run(cfg, log=console.print, overwrite=overwrite)
    from msa.pipeline.tasks import task_of_metrics

    summary = task_of_metrics(result.metrics).summary(result.metrics)
    console.print(f"{summary}  (best epoch {result.best_epoch}, {result.seconds:.1f} s)")
    console.print(f"run: {result.run_dir}")


@app.command()
@with_train_options
@one_line_errors
def sweep(
    fusion: str = typer.Option(",".join(default(SweepConfig, "fusions")), help="Heads, comma-separated."),
    seeds: str = typer.Option(",".join(map(str, default(SweepConfig, "seeds"))), help="Seeds, comma-separated."),
    grid: list[str] = typer.Option(None, help="FIELD=V1,V2 over any train-head option; repeat for more."),
    out: Path = typer.Option(default(SweepConfig, "out"), help="Sweep directory (one run dir per run); a sweep "
                                                               "into an earlier sweep's resumes it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain finished runs whose options changed."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    workers: int = typer.Option(default(SweepConfig, "workers"),
                                help="Worker processes sharing the CPU threads (2 helps small heads on 2 cores)."),
    **options,
) -> None:
    """Train every head x seed x grid combination on shared in-memory features; resumable."""
    from msa.stages import sweep as stage

    # The sweep's own --fusion, --seeds and --out are not the base run's.
    base = _train_head_config(options)
    cfg = SweepConfig(base=base, out=out, fusions=_names(fusion), seeds=tuple(int(s) for s in _names(seeds)),
                      grid=stage.parse_grid(grid or []), workers=workers)
    table = stage.run(cfg, show_progress=progress, overwrite=overwrite)
    console.print(stage.leaderboard_table(stage.leaderboard(table, list(cfg.grid)), list(cfg.grid)))
    console.print(f"results: {out / 'results.csv'} ({len(table)} runs)")


def _f(field: str):
    return default(FinetuneConfig, field)


@app.command()
@one_line_errors
def finetune(
    data: Path = typer.Option(None, help="MVSA folder (not needed with --resume)."),
    out: Path = typer.Option(None, help="Run directory (default runs/finetune-<fusion>-seed<seed>-<time>); must "
                                        "be new."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds (an msa run only)."),
    resume: Path = typer.Option(None, help="Continue this run exactly where it stopped (its options are kept)."),
    text_model: str = typer.Option(_f("text_model")), max_len: int = typer.Option(_f("max_len")),
    pooling: str = typer.Option(_f("pooling")), image_model: str = typer.Option(_f("image_model")),
    image_weights: str = typer.Option(None), fusion: str = typer.Option(_f("fusion")),
    hidden: int = typer.Option(_f("hidden")), dropout: float = typer.Option(_f("dropout")),
    unfreeze_text_layers: int = typer.Option(_f("unfreeze_text_layers")),
    unfreeze_image_stages: int = typer.Option(_f("unfreeze_image_stages")),
    lr_encoder: float = typer.Option(_f("lr_encoder")), lr_fusion: float = typer.Option(_f("lr_fusion")),
    lr_head: float = typer.Option(_f("lr_head")), weight_decay: float = typer.Option(_f("weight_decay")),
    warmup_ratio: float = typer.Option(_f("warmup_ratio")), epochs: int = typer.Option(_f("epochs")),
    batch_size: int = typer.Option(_f("batch_size")), grad_accum: int = typer.Option(_f("grad_accum")),
    grad_clip: float = typer.Option(_f("grad_clip"), help="Max gradient norm (0: off)."),
    loss: str = typer.Option(_f("loss")), class_weights: str = typer.Option(None),
    label_smoothing: float = typer.Option(_f("label_smoothing")), focal_gamma: float = typer.Option(_f("focal_gamma")),
    select: str = typer.Option(_f("select")), patience: int = typer.Option(_f("patience")),
    seed: int = typer.Option(_f("seed")),
    image_aug: str = typer.Option(_f("image_aug"), help="none | weak | strong (weak + RandAugment)."),
    clean_text: bool = typer.Option(_f("clean_text"), help="Drop URLs, @mentions; unwrap #tags."),
    val_ratio: float = typer.Option(_f("val_ratio")), split_seed: int = typer.Option(_f("split_seed")),
    on_bad_image: str = typer.Option(_f("on_bad_image")), on_duplicate: str = typer.Option(_f("on_duplicate")),
    limit: int = typer.Option(None),
    device: str = typer.Option(_f("device")), precision: str = typer.Option(_f("precision")),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Fine-tune the encoders' tops and a fusion head end to end on raw data (checkpointed every epoch)."""
    options = {k: v for k, v in locals().items() if k not in ("resume", "progress", "overwrite")}
    from msa.pipeline import rundir
    from msa.stages import finetune as stage

    if resume:
        cfg = from_record(FinetuneConfig, rundir.read_json(resume / rundir.CONFIG), out=resume)
    elif data is None:
        raise ValueError("--data is needed (or --resume RUN)")
    else:
        options["class_weights"] = tuple(float(w) for w in _names(class_weights)) or None
        cfg = FinetuneConfig(**options)
    run_dir = stage.run(cfg, resume=bool(resume), show_progress=progress, log=console.print, overwrite=overwrite)
    metrics = rundir.read_json(run_dir / rundir.METRICS)
    console.print(f"val accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
                  f"(best epoch {metrics['best_epoch']})")
    console.print(f"run: {run_dir}")


@app.command()
@one_line_errors
def predict(
    run: Path = typer.Option(..., help="Run directory."),
    data: Path = typer.Option(None, help="MVSA folder to predict (default: the run's own data)."),
    split: str = typer.Option(default(PredictConfig, "split"), help="test | val | train | all."),
    out: Path = typer.Option(None, help="Output file (default RUN/predictions-<split>.txt; new data: "
                                        "RUN/predictions-<data>-<id>-<split>.txt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    cache: Path = typer.Option(None, help="Cache for new data (default RUN/predict-cache)."),
    device: str = typer.Option(default(PredictConfig, "device")),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Write guid,tag predictions of a run, extracting new data with the run's encoders."""
    from msa.stages import predict as stage

    path, predictions = stage.run(PredictConfig(run=run, data=data, split=split, out=out, cache=cache,
                                                device=device), show_progress=progress, overwrite=overwrite)
    if predictions.scores is not None:
        console.print(f"{len(predictions.guids)} predicted scores (mean {predictions.scores.mean():.3f}): {path}")
        return
    counts = {c: predictions.predicted.count(c) for c in predictions.class_names}
    console.print(f"{len(predictions.guids)} predictions ({', '.join(f'{k} {v}' for k, v in counts.items())}): {path}")


@app.command()
@one_line_errors
def evaluate(
    run: Path = typer.Option(..., help="Run directory."),
    labels: Path = typer.Option(None, help="guid,tag file (default: the run's validation predictions)."),
    text_run: Path = typer.Option(None, help="A text-only run, for the agreement analysis."),
    image_run: Path = typer.Option(None, help="An image-only run, for the agreement analysis."),
    out: Path = typer.Option(None, help="Where the report goes (default RUN/evaluation)."),
) -> None:
    """Metrics, bad cases, modality agreement and gate statistics of a run."""
    from msa.stages import evaluate as stage

    report = stage.run(EvaluateConfig(run=run, labels=labels, text_run=text_run, image_run=image_run, out=out))
    console.print(stage.report_tables(report))


@app.command()
@one_line_errors
def demo(
    out: Path = typer.Option(Path("demo"), help="Where the generated data, models, cache and runs go."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Generate a small data set and tiny random encoders, then run the pipeline on them."""
    from msa.stages import demo as stage

    stage.run(out, show_progress=progress)


if __name__ == "__main__":
    app()
