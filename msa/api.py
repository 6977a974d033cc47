"""msa from Python: the stages the CLI runs, as functions taking the CLI's options by name, and
a run to predict with, on data folders or on posts held in memory.

    import msa

    msa.extract(data="DATA", cache="cache", modalities=("text", "image"))
    run = msa.train_head(cache="cache", fusion="late", out="runs/late")
    run = msa.load_run("runs/late")
    run.predict(texts=["what a day"], images=["photo.jpg"])  # [{"label": ..., "probabilities": {...}}]
    run.evaluate()                                            # metrics of its val (or out-of-fold) items

The CLI calls the same stage functions with the same configs, so both give the same numbers.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from msa.core import rundir
from msa.core.config import EvaluateConfig, ExtractConfig, FinetuneConfig, TrainHeadConfig

Image = object  # a PIL.Image.Image, a path, or None; PIL stays an import of the image path alone


def extract(show_progress: bool = False, **options):
    """`msa extract`: ExtractConfig's fields by name (data=, cache=, text_model=, ...)."""
    from msa.stages import extract as stage

    return stage.run(ExtractConfig(**options), show_progress=show_progress)


def train_head(overwrite: bool = False, **options) -> Run:
    """`msa train-head`: TrainHeadConfig's fields by name; the finished run."""
    from msa.stages import train_head as stage

    return load_run(stage.run(TrainHeadConfig(**options), log=lambda *_: None, overwrite=overwrite).run_dir)


def finetune(overwrite: bool = False, show_progress: bool = False, **options) -> Run:
    """`msa finetune`: FinetuneConfig's fields by name; the finished run."""
    from msa.stages import finetune as stage

    return load_run(stage.run(FinetuneConfig(**options), show_progress=show_progress, log=lambda *_: None,
                              overwrite=overwrite))


def load_run(path: str | Path) -> Run:
    """A finished run directory of train-head or finetune (a cross-validation's too)."""
    path = Path(path)
    if not (path / rundir.CONFIG).is_file():
        raise rundir.RunDirError(f"{path}: not a run directory (no {rundir.CONFIG}); give the --out of a train-head or "
                          "finetune run")
    if not rundir.is_finished(path):
        raise rundir.RunDirError(f"{path}: the run did not finish (no {rundir.METRICS}); rerun its command to "
                                 "finish it")
    return Run(path, rundir.read_json(path / rundir.CONFIG), rundir.read_json(path / rundir.METRICS))


@dataclasses.dataclass
class Run:
    path: Path
    config: dict
    metrics: dict

    def predict(self, texts: Sequence[str], images: Sequence[Image] | None = None, device: str = "auto",
                show_progress: bool = False) -> list[dict]:
        """Labels and class probabilities of posts held in memory (regression runs: scores), in
        order. `images`: one per text, each a path, a PIL image or None (no image, as a post
        whose image is missing). The posts become a small MVSA folder that the run predicts as
        it predicts any data: extracted with its encoders, through its model."""
        from msa.stages import predict as stage

        images = list(images) if images is not None else [None] * len(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts and {len(images)} images: give one image (or None) per text")
        from msa.data.mvsa import DataError

        missing = [str(image) for image in images if isinstance(image, (str, Path)) and not Path(image).is_file()]
        if missing:
            raise DataError(f"image {missing[0]}: no such file")
        with tempfile.TemporaryDirectory(prefix="msa-posts-") as folder:
            data = write_posts(Path(folder) / "posts", texts, images)
            predictions = stage.predict(self.path, data, "all", Path(folder) / "cache", device, show_progress)
        row_of = {guid: row for row, guid in enumerate(predictions.guids)}
        rows = [row_of[post_guid(i)] for i in range(len(texts))]
        if predictions.scores is not None:
            return [{"score": float(predictions.scores[r])} for r in rows]
        return [{"label": predictions.predicted[r],
                 "probabilities": dict(zip(predictions.class_names, map(float, predictions.probabilities[r])))}
                for r in rows]

    def predict_data(self, data: str | Path | None = None, split: str = "test", device: str = "auto",
                     show_progress: bool = False):
        """Predictions (stages.predict.Predictions) of an MVSA folder's items, or the run's own."""
        from msa.stages import predict as stage

        return stage.predict(self.path, Path(data) if data else None, split, None, device, show_progress)

    def evaluate(self, **options) -> dict:
        """`msa evaluate --run RUN`: EvaluateConfig's other fields by name."""
        from msa.stages import evaluate as stage

        return stage.run(EvaluateConfig(run=self.path, **options))


def post_guid(index: int) -> str:
    return f"post{index:06d}"


def write_posts(folder: Path, texts: Sequence[str], images: Sequence[Image]) -> Path:
    """An MVSA folder of unlabelled posts: data/GUID.txt, data/GUID.jpg (a path's bytes as they are,
    a PIL image losslessly as PNG: the reader decodes by content), test_without_label.txt."""
    (folder / "data").mkdir(parents=True)
    for i, (text, image) in enumerate(zip(texts, images)):
        guid = post_guid(i)
        (folder / "data" / f"{guid}.txt").write_text(text, encoding="utf-8")
        if image is None:
            continue
        if isinstance(image, (str, Path)):
            shutil.copyfile(image, folder / "data" / f"{guid}.jpg")
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            (folder / "data" / f"{guid}.jpg").write_bytes(buffer.getvalue())
    (folder / "train.txt").write_text("guid,tag\n")  # no labelled posts
    (folder / "test_without_label.txt").write_text(
        "guid,tag\n" + "".join(f"{post_guid(i)},null\n" for i in range(len(texts))))
    return folder
