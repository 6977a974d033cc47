"""The quick-start job: generated data and tiny random encoders through every stage."""

from __future__ import annotations

from pathlib import Path

from msa.core.config import CaptionConfig, ExtractConfig, PredictConfig, TrainHeadConfig
from msa.core.progress import console
from msa.data.demo import (
    make_demo_dataset,
    make_tiny_captioner,
    make_tiny_image_weights,
    make_tiny_text_model,
)
from msa.stages import caption, extract, predict, train_head

DEMO_IMAGE_MODEL = "timm:test_efficientnet"


def run(out: Path, show_progress: bool = True) -> dict:
    """Build (once) the demo data and models under `out`; caption, extract (post text + caption),
    train a GMU head, predict."""
    out = Path(out)
    data = out / "data"
    if not (data / "train.txt").is_file():
        make_demo_dataset(data, n_labelled=120, n_test=20, messy=True)
    text_model = out / "models" / "tiny-bert"
    if not (text_model / "config.json").is_file():
        make_tiny_text_model(text_model)
    image_weights = out / "models" / "test_efficientnet.pth"
    if not image_weights.is_file():
        make_tiny_image_weights(image_weights, DEMO_IMAGE_MODEL)

    captioner = out / "models" / "tiny-blip"
    if not (captioner / "config.json").is_file():
        make_tiny_captioner(captioner)

    captioned = caption.run(CaptionConfig(data=data, cache=out / "cache", model=str(captioner), batch_size=16),
                            show_progress=show_progress)
    console.print(caption.summary_table(captioned))
    extract_cfg = ExtractConfig(data=data, cache=out / "cache", text_model=str(text_model), max_len=32,
                                image_model=DEMO_IMAGE_MODEL, image_weights=str(image_weights), batch_size=16,
                                text_source="raw+caption")
    extracted = extract.run(extract_cfg, show_progress=show_progress)
    for table in extract.summary_tables(extracted):
        console.print(table)

    head_cfg = TrainHeadConfig(cache=extract_cfg.cache, fusion="gmu", out=out / "runs" / "gmu", epochs=15,
                               batch_size=16, lr=3e-3, hidden=64)
    trained = train_head.run(head_cfg, log=console.print, overwrite=True)  # the demo owns its directory
    m = trained.metrics
    console.print(f"gmu head: val accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
                  f"({trained.seconds:.1f} s, best epoch {trained.best_epoch})")

    predictions_file, _ = predict.run(PredictConfig(run=trained.run_dir), show_progress=show_progress)
    console.print(f"data:        {data}\ncache:       {extract_cfg.cache}\nrun:         {trained.run_dir}"
                  f"\npredictions: {predictions_file}")
    return {"data": data, "cache": extract_cfg.cache, "captions": captioned.path, "run": trained.run_dir,
            "predictions": predictions_file, "metrics": m}
