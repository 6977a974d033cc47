"""Image features from the device's decode against the CPU's, on real photos, in fp32.

    python bench/decode_agreement.py --data DATA --models MODELS [--items 200]

The CPU path decodes a JPEG in draft mode (libjpeg's DCT scaling by 1/2, 1/4 or 1/8) and
resizes; the device path (`--image-decode device`, nvJPEG on a GPU) decodes it whole, box-
averages it by the same factor and resizes. Here both run on the CPU (torchvision's decoder
stands in for nvJPEG: the same JPEG standard), and the script prints the cosine of each
photo's pooled Lite0 feature between the two, and without the box averaging for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from msa.data.mvsa import read_mvsa
from msa.models.image import build_image_encoder, is_plain_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()
    from torchvision.io import ImageReadMode, decode_jpeg

    from msa.models.image import draft_scaled

    encoder = build_image_encoder("timm:tf_efficientnet_lite0", str(args.models / "tf_efficientnet_lite0.pth")).eval()
    preprocess = encoder.preprocess
    items, _ = read_mvsa(args.data)
    paths = [i.image_path for i in items if not any(f.endswith("_image") for f in i.flags)][: args.items]
    plain = [p for p in paths if is_plain_jpeg(Path(p).read_bytes())]

    def device_path(path: str, box: bool) -> torch.Tensor:
        pixels = decode_jpeg(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
        return preprocess.resized_crop(draft_scaled(pixels, preprocess.resize) if box else pixels)

    def pooled(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([encoder(preprocess.normalise(part))[1].float() for part in batch.split(32)])

    cpu = pooled(torch.stack([preprocess.load(p) for p in plain]))
    print(f"{len(plain)} plain JPEGs of the first {len(paths)} readable photos, Lite0, fp32")
    print("| device path | cosine min | 1st percentile | mean |")
    print("|---|---|---|---|")
    for name, box in (("whole decode, resize", False), ("whole decode, box by the draft factor, resize", True)):
        cosine = torch.nn.functional.cosine_similarity(cpu, pooled(torch.stack([device_path(p, box) for p in plain])))
        cosine = cosine.numpy()
        print(f"| {name} | {cosine.min():.4f} | {np.percentile(cosine, 1):.4f} | {cosine.mean():.5f} |")


if __name__ == "__main__":
    main()
