"""The quick-start job: generated data and tiny random encoders through every stage."""

from __future__ import annotations

from pathlib import Path

from msa.pipeline.config import ExtractConfig
from msa.pipeline.demo import make_demo_dataset, make_tiny_image_weights, make_tiny_text_model
from msa.pipeline.progress import console
from msa.stages import extract

DEMO_IMAGE_MODEL = "timm:test_efficientnet"


def run(out: Path, show_progress: bool = True) -> dict:
    """Build (once) the demo data and models under `out`, then extract. Returns the paths."""
    out = Path(out)
    data = out / "data"
    if not (data / "train.txt").is_file():
        make_demo_dataset(data, n_labelled=48, n_test=12, messy=True)
    text_model = out / "models" / "tiny-bert"
    if not (text_model / "config.json").is_file():
        make_tiny_text_model(text_model)
    image_weights = out / "models" / "test_efficientnet.pth"
    if not image_weights.is_file():
        make_tiny_image_weights(image_weights, DEMO_IMAGE_MODEL)
    cfg = ExtractConfig(data=data, cache=out / "cache", text_model=str(text_model), max_len=32,
                        image_model=DEMO_IMAGE_MODEL, image_weights=str(image_weights), batch_size=16)
    result = extract.run(cfg, show_progress=show_progress)
    for table in extract.summary_tables(result):
        console.print(table)
    console.print(f"data: {data}\ncache: {cfg.cache}")
    return {"data": data, "cache": cfg.cache, "extract": result}
