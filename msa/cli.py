"""The `msa` command line: each command parses options into a stage config and runs it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from msa.pipeline.config import ExtractConfig, default
from msa.pipeline.progress import console

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
cache_app = typer.Typer(help="Inspect and maintain a feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _fail(err: Exception) -> None:
    """Known problems (bad data, a model that will not load) end with one clear line."""
    console.print(f"[red]error:[/red] {err}", soft_wrap=True)
    raise typer.Exit(code=2)


def _known_errors() -> tuple[type[Exception], ...]:
    from msa.cache.features import CacheError
    from msa.models.text import EncoderLoadError
    from msa.pipeline.mvsa import DataError

    return DataError, EncoderLoadError, CacheError, FileNotFoundError, ValueError


@app.command()
def extract(
    data: Path = typer.Option(..., help="MVSA folder (train.txt, test_without_label.txt, data/)."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory for this data set."),
    text_model: str = typer.Option(default(ExtractConfig, "text_model"), help="HF hub id or local model directory."),
    max_len: int = typer.Option(default(ExtractConfig, "max_len"), help="Tokens kept per text."),
    pooling: str = typer.Option(default(ExtractConfig, "pooling"), help="Pooled text feature: mean | cls."),
    image_model: str = typer.Option(default(ExtractConfig, "image_model"), help="torchvision name or timm:NAME."),
    image_weights: str = typer.Option(None, help="Local state dict for the image model (no download)."),
    on_bad_image: str = typer.Option(default(ExtractConfig, "on_bad_image"), help="blank | skip | fail."),
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
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Encode every item of an MVSA data set once and cache the features (resumable)."""
    from msa.stages import extract as stage

    cfg = ExtractConfig(data=data, cache=cache, text_model=text_model, max_len=max_len, pooling=pooling,
                        image_model=image_model, image_weights=image_weights, on_bad_image=on_bad_image,
                        val_ratio=val_ratio, split_seed=split_seed, device=device, precision=precision,
                        compile=compile, batch_size=batch_size, limit=limit, shard=shard,
                        modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()))
    try:
        result = stage.run(cfg, show_progress=progress)
    except _known_errors() as err:
        _fail(err)
    for table in stage.summary_tables(result):
        console.print(table)
    console.print(f"cache: {cache.resolve()}")


@cache_app.command("ls")
def cache_ls(cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory.")) -> None:
    """List the manifest and every feature set in a cache, with sizes."""
    from msa.cache.features import list_feature_files
    from msa.cache.manifest import read_manifest

    try:
        manifest = read_manifest(cache)
    except FileNotFoundError as err:
        _fail(err)
    console.print(f"manifest {manifest.manifest_id}: {len(manifest)} items from {manifest.info['data_dir']}")
    table = Table()
    for column in ("file", "status", "rows", "pooled", "tokens", "MB", "model", "matches manifest"):
        table.add_column(column)
    for row in list_feature_files(cache):
        fp = row.get("fingerprint", {})
        table.add_row(row["file"], row["status"], row.get("rows", ""), str(row.get("pooled", "")),
                      str(row.get("tokens", "")), str(row.get("size_mb", "")), str(fp.get("model", "")),
                      "yes" if fp.get("manifest_id") == manifest.manifest_id else "no (stale)")
    console.print(table)


@cache_app.command("info")
def cache_info(
    name: str = typer.Argument(..., help="Feature set name (from `msa cache ls`, without .h5)."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
) -> None:
    """Show one feature set's fingerprint and shapes as JSON."""
    from msa.cache.features import find_feature_set

    try:
        feature_set = find_feature_set(cache, name.removesuffix(".h5"))
    except _known_errors() as err:
        _fail(err)
    typer.echo(json.dumps({"name": feature_set.name, "rows": len(feature_set.guids),
                           "shapes": feature_set.shapes, "fingerprint": feature_set.fingerprint}, indent=2))


@cache_app.command("merge")
def cache_merge(
    name: str = typer.Argument(..., help="Feature set name whose shards to join."),
    cache: Path = typer.Option(default(ExtractConfig, "cache"), help="Cache directory."),
) -> None:
    """Join the shard files written by `msa extract --shard i/n` into one feature set."""
    from msa.cache.features import merge_shards

    try:
        path = merge_shards(cache, name)
    except _known_errors() as err:
        _fail(err)
    console.print(f"merged: {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Where the generated data, models, cache and runs go."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Generate a small data set and tiny random encoders, then run the pipeline on them."""
    from msa.stages import demo as stage

    stage.run(out, show_progress=progress)


if __name__ == "__main__":
    app()
