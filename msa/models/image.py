"""Image encoders: torchvision models by name, or timm models as `timm:NAME`.

Every encoder returns token features (the last spatial map flattened, `[B, H*W, C]`,
or a ViT's tokens) and a pooled feature `[B, C]`, and carries the preprocessing its
weights were trained with, so the cache fingerprint records exactly what was done.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps
from torch import nn

from msa.core.config import ConfigError, resolve_layer_count
from msa.core.fingerprint import file_digest
from msa.models.text import EncoderLoadError

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Resize the short side, centre-crop, normalise: the ImageNet evaluation recipe."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def load(self, path: str | None) -> torch.Tensor:
        """One image as uint8 `[3, crop, crop]`, a view of height-width-channel memory;
        None gives a blank (mean-colour) image."""
        if path is None:
            colour = torch.tensor(self.mean).mul(255).round().to(torch.uint8)
            return colour[:, None, None].expand(3, self.crop, self.crop)
        return self.resized_crop(decode_rgb(path, self.resize))

    def resized_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[3, H, W]` (on any device) resized on its short side and centre-cropped."""
        height, width = pixels.shape[1:]
        scale = self.resize / min(width, height)
        size = (max(self.crop, round(height * scale)), max(self.crop, round(width * scale)))
        # torch's uint8 antialiased resize: PIL's filter (within 2 of 255 levels), at half its time
        # on one thread; decoding feeds a bf16 encoder on the same two cores.
        with torch.inference_mode():
            resized = torch.nn.functional.interpolate(pixels[None], size=size, mode=self.interpolation,
                                                      antialias=True)[0]
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        return resized[:, top: top + self.crop, left: left + self.crop]

    def load_batch_on(self, paths: list[str | None], device: torch.device) -> tuple[torch.Tensor, int]:
        """uint8 `[B, 3, crop, crop]` on `device`, and how many images the CPU decoded. The JPEG
        bytes are read here and decoded as one batch on the device (nvJPEG on CUDA: the CPU only
        reads files), resized and cropped there. What the batch decoder should not or cannot take
        (PNG and other formats, EXIF-turned or CMYK JPEGs, a file it refuses) goes through the CPU
        path image by image, as `load` decodes it, copied over from pinned memory."""
        from torchvision.io import ImageReadMode, decode_jpeg

        batch = torch.empty(len(paths), 3, self.crop, self.crop, dtype=torch.uint8, device=device)
        data = {i: Path(p).read_bytes() for i, p in enumerate(paths) if p is not None}
        plain = [i for i, d in data.items() if is_plain_jpeg(d)]
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in plain]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []
        except RuntimeError:  # one file the batch decoder refuses: the others one by one
            decoded = [decoded_or_none(e, device) for e in encoded]
        on_device = set()
        for i, pixels in zip(plain, decoded):
            if pixels is not None:
                batch[i] = self.resized_crop(draft_scaled(pixels, self.resize))
                on_device.add(i)
        pinned = device.type == "cuda"
        for i, path in enumerate(paths):
            if i not in on_device:
                pixels = self.load(path).contiguous()
                batch[i] = (pixels.pin_memory() if pinned else pixels).to(device, non_blocking=pinned)
        return batch.contiguous(memory_format=torch.channels_last), len(paths) - len(on_device)

    def load_batch(self, paths: list[str | None]) -> torch.Tensor:
        """uint8 `[B, 3, crop, crop]` in channels_last memory, the layout the encoders run in:
        decoded images are height-width-channel already, so no pass over the batch reorders it."""
        batch = torch.empty(len(paths), self.crop, self.crop, 3, dtype=torch.uint8)
        for i, path in enumerate(paths):
            batch[i] = self.load(path).permute(1, 2, 0)
        return batch.permute(0, 3, 1, 2)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, 3, H, W]` -> float, normalised, in the batch's memory format: one pass."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, batch, 1 / (255 * std))


# Viewers turn a photo by its EXIF orientation, and annotators labelled what they saw: so do we.
EXIF_ORIENTATION = 0x0112


def decode_rgb(path: str, short_side: int) -> torch.Tensor:
    """uint8 `[3, H, W]` as PIL's JPEG draft mode decodes it for `short_side`: at the largest
    1/2^k scale (k <= 3) that keeps both sides >= short_side, turned upright by its EXIF orientation.

    JPEGs go through simplejpeg (libjpeg-turbo, as in PIL) at that same scale: the same pixels
    (tested) in 0.65 instead of 0.85 ms for an MVSA photo, without PIL's per-image overhead.
    Other formats, CMYK JPEGs, turned JPEGs and those simplejpeg refuses (damaged but readable)
    go through PIL."""
    data = Path(path).read_bytes()
    if data[:2] == b"\xff\xd8" and _orientation(data) == 1:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace not in ("YCbCr", "Gray"):  # CMYK comes out 1 level off PIL's: leave it to PIL
                raise ValueError(colorspace)
            room = min(width, height) // short_side
            factor = next((f for f in (8, 4, 2) if room >= f), 1)
            # simplejpeg decodes at the smallest of its scales giving at least these sizes
            decoded = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // factor),
                                             min_width=-(-width // factor))
            return torch.from_numpy(decoded).permute(2, 0, 1)
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (short_side, short_side))
        upright = ImageOps.exif_transpose(img)
        return torch.from_numpy(rgb_array(upright)).permute(2, 0, 1)


def is_plain_jpeg(data: bytes) -> bool:
    """An upright YCbCr or grey JPEG: what a batch decoder gives the same picture of."""
    if data[:2] != b"\xff\xd8" or _orientation(data) != 1:
        return False
    try:
        return simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray")
    except ValueError:
        return False


def draft_scaled(pixels: torch.Tensor, short_side: int) -> torch.Tensor:
    """A whole-decoded JPEG box-averaged down by the factor the CPU's draft decode scales it
    (decode_rgb): the CPU path's pixels within a fifth of a level on average, where resizing
    the whole decode alone differed by nearly one (features: cosine 0.9997 against 0.9979,
    bench/decode_agreement.py)."""
    room = min(pixels.shape[1:]) // short_side
    factor = next((f for f in (8, 4, 2) if room >= f), 1)
    if factor == 1:
        return pixels
    pooled = torch.nn.functional.avg_pool2d(pixels[None].float(), factor, ceil_mode=True)[0]
    return pooled.round_().clamp_(0, 255).to(torch.uint8)


def decoded_or_none(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG (1: upright), read from its header only."""
    if b"Exif" not in data[:65536]:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # an unreadable EXIF block: the pixels are still the pixels
        return 1


def rgb_array(img: Image.Image) -> np.ndarray:
    """uint8 RGB of any PIL mode. 16- and 32-bit images are scaled to 8 bits: PIL's own convert
    clips them, and a 16-bit grey photo comes out nearly white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img, dtype=np.float32)
        top = 255.0 if values.max(initial=0) <= 255 else 65535.0 if values.max() <= 65535 else float(values.max())
        grey = np.clip(np.nan_to_num(values) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))


class ImageEncoder(nn.Module):
    """Wraps a trunk `[B, 3, H, W] -> [B, C, h, w]` (or `[B, T, C]`) and a pooling."""

    def __init__(self, trunk: nn.Module, pool: nn.Module, preprocess: ImagePreprocess, dim: int):
        super().__init__()
        self.trunk = trunk
        self.pool = pool
        self.preprocess = preprocess
        self.dim = dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(images)
        pooled = self.pool(features)  # [B, C]
        if features.ndim == 4:  # CNN map [B, C, h, w] -> tokens [B, h*w, C]
            features = features.flatten(2).transpose(1, 2)
        return features, pooled


    def split(self, stages: int | str) -> tuple[nn.Module, ImageEncoder]:
        """(bottom, top): bottom(images) is the activation entering the last `stages` stages
        (e.g. ResNet layer4's input; "all": the stem's output); top(activation) gives what
        forward(images) gives. Both share this encoder's modules."""
        stem, blocks, tail = trunk_stages(self.trunk)
        stages = resolve_layer_count(stages, len(blocks), "the image split (stages)")
        bottom = nn.Sequential(*stem, *blocks[: len(blocks) - stages])
        top = ImageEncoder(nn.Sequential(*blocks[len(blocks) - stages:], *tail), self.pool, self.preprocess, self.dim)
        return bottom, top


def trunk_stages(trunk: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """A trunk as (stem, stages, tail) modules run in that order."""
    if isinstance(trunk, TimmTrunk) and all(hasattr(trunk.model, a) for a in ("conv_stem", "bn1", "blocks")):
        model = trunk.model  # timm EfficientNet / MobileNet: forward_features is stem, blocks, head conv
        return [model.conv_stem, model.bn1], list(model.blocks), [model.conv_head, model.bn2]
    if isinstance(trunk, nn.Sequential) and hasattr(trunk, "7"):  # torchvision ResNet: stem, layer1-4
        modules = list(trunk)
        if len(modules) == 8:
            return modules[:4], modules[4:], []
    if isinstance(trunk, TimmTrunk) and hasattr(trunk.model, "layer4"):  # timm ResNet
        model = trunk.model
        return ([model.conv1, model.bn1, model.act1, model.maxpool],
                [model.layer1, model.layer2, model.layer3, model.layer4], [])
    raise ConfigError(f"splitting {type(trunk).__name__} into stages is not supported (EfficientNet/MobileNet "
                     "via timm and ResNets are)")


class SpatialMean(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(2, 3))


class TimmPool(nn.Module):
    """timm's own head up to the logits (global pool for CNNs, class token for ViTs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=True)


class TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def weights_identity(name: str, weights: str | None) -> str:
    """What pins the image weights: the file's digest, or the library's named weights."""
    if weights:
        return file_digest(Path(weights))
    return "timm:pretrained" if name.startswith("timm:") else "torchvision:DEFAULT"


def image_preprocess(name: str) -> ImagePreprocess:
    """The preprocessing a model's pretrained weights expect, without building the model."""
    if name.startswith("timm:"):
        import timm

        pretrained = timm.get_pretrained_cfg(name.removeprefix("timm:"))
        if pretrained is None:
            raise EncoderLoadError(f"unknown timm model {name!r}")
        config = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict())
        crop = config["input_size"][-1]
        return ImagePreprocess(
            resize=int(crop / config["crop_pct"]),
            crop=crop,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            interpolation=config["interpolation"] if config["interpolation"] in INTERPOLATIONS else "bicubic",
        )
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise EncoderLoadError(
            f"unknown image model {name!r}: use a torchvision classification model name "
            "(resnet50, efficientnet_b0, ...) or timm:NAME"
        )
    # The transforms of the named weights are plain numbers; they need no download.
    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return ImagePreprocess(
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        interpolation=transforms.interpolation.value,
    )


def build_image_encoder(name: str, weights: str | None = None) -> ImageEncoder:
    """`resnet50` (torchvision, ImageNet weights) or `timm:NAME`; `weights` is a local state dict."""
    if weights and not Path(weights).is_file():
        raise EncoderLoadError(f"--image-weights {weights}: no such file")
    if name.startswith("timm:"):
        return _build_timm(name.removeprefix("timm:"), weights)
    return _build_torchvision(name, weights)


def _load_state_dict(model: nn.Module, weights: str) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise EncoderLoadError(f"--image-weights {weights} does not fit this model: {err}") from err


def _build_timm(name: str, weights: str | None) -> ImageEncoder:
    import timm

    try:
        model = timm.create_model(name, pretrained=weights is None)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise EncoderLoadError(f"unknown timm model {name!r}: {err}") from err
    except Exception as err:  # download failures come in many types
        raise EncoderLoadError(
            f"could not get pretrained weights for timm:{name} ({err}). Without access to "
            "the model hub, pass a local state dict with --image-weights PATH."
        ) from err
    if weights:
        _load_state_dict(model, weights)
    return ImageEncoder(TimmTrunk(model), TimmPool(model), image_preprocess(f"timm:{name}"),
                        model.num_features).eval()


def _build_torchvision(name: str, weights: str | None) -> ImageEncoder:
    import torchvision

    image_preprocess(name)  # fails early, with the known names, for an unknown model
    default_weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=None if weights else default_weights)
    except Exception as err:  # download failures come in many types
        raise EncoderLoadError(
            f"could not download ImageNet weights for {name} ({err}). Without internet, pass "
            "a local state dict with --image-weights PATH."
        ) from err
    if weights:
        _load_state_dict(model, weights)
    trunk, dim = _torchvision_trunk(model)
    return ImageEncoder(trunk, SpatialMean(), image_preprocess(name), dim).eval()


def _torchvision_trunk(model: nn.Module) -> tuple[nn.Module, int]:
    """The convolutional trunk, up to the last spatial map."""
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                              model.layer1, model.layer2, model.layer3, model.layer4)
        return trunk, model.fc.in_features
    if hasattr(model, "features"):  # EfficientNet, MobileNet, ConvNeXt, VGG, DenseNet
        with torch.no_grad():
            dim = model.features(torch.zeros(1, 3, 64, 64)).shape[1]
        return model.features, dim
    raise EncoderLoadError(f"{type(model).__name__}: no known convolutional trunk; use timm:NAME instead")
