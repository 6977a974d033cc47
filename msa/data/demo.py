"""A small generated MVSA-style data set with a planted signal, and tiny local encoders.

The quick-start demo and the tests run on these: no network, no downloaded weights.
Each class has its own words and its own image colour, so features from even a random
encoder separate the classes and a trained head must beat the majority class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from msa.data.mvsa import LABELS

CLASS_WORDS = {
    "positive": ["happy", "great", "love", "sunny", "win"],
    "neutral": ["table", "street", "monday", "report", "grey"],
    "negative": ["sad", "awful", "hate", "storm", "lose"],
}
FILLER_WORDS = ["the", "a", "today", "photo", "with", "my", "friends", "this", "is", "at"]
CLASS_COLOURS = {"positive": (220, 60, 40), "neutral": (120, 120, 120), "negative": (40, 60, 200)}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Messy inputs planted when messy=True, by guid: what each one exercises.
MESSY = {
    "9001": "gb18030 text",
    "9002": "cp1252 text",
    "9003": "empty text",
    "9004": "missing text file",
    "9005": "missing image",
    "9006": "truncated image",
    "9007": "not an image",
}


def make_demo_dataset(root: Path, n_labelled: int = 48, n_test: int = 12, seed: int = 0,
                      messy: bool = False, image_size: int = 64) -> Path:
    """Write train.txt, test_without_label.txt and data/ under root; returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    # Imbalanced like MVSA: neutral is the small class.
    labels = rng.choice(LABELS, size=n_labelled + n_test, p=[0.3, 0.2, 0.5]).tolist()
    guids = [str(i) for i in range(1, n_labelled + n_test + 1)]
    for guid, label in zip(guids, labels):
        _write_pair(root, guid, label, rng, image_size)
    train_lines = [f"{g},{lab}" for g, lab in zip(guids[:n_labelled], labels[:n_labelled])]
    test_lines = [f"{g},null" for g in guids[n_labelled:]]
    if messy:
        train_lines += _write_messy(root, rng, image_size)
        train_lines.append(train_lines[0])  # a duplicate guid
        train_lines[1] = train_lines[1].replace(labels[1], f" {labels[1].title()} ")  # case and spaces
    (root / "train.txt").write_text("guid,tag\n" + "\n".join(train_lines) + "\n")
    (root / "test_without_label.txt").write_text("guid,tag\n" + "\n".join(test_lines) + "\n")
    return root


def make_mvsa_release(root: Path, layout: str = "single", n_posts: int = 60, seed: int = 0,
                      image_size: int = 32) -> tuple[Path, dict[str, str | None]]:
    """An original MVSA release (`labelResultAll.txt`, data/ID.txt|jpg), MVSA-Single (one
    text,image pair a line) or MVSA-Multiple (three annotators). Besides posts whose text and
    image agree, it plants every case of the field's rules: one modality neutral, positive
    against negative, and (Multiple) annotators all differing. Returns the folder and each ID's
    expected label (None: the rules drop it)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    annotators = 1 if layout == "single" else 3
    lines, expected = ["ID\t" + "\t".join(["text,image"] * annotators)], {}
    for index in range(1, n_posts + 1):
        guid, label = str(index), str(rng.choice(LABELS, p=[0.3, 0.2, 0.5]))
        _write_pair(root, guid, label, rng, image_size)
        case = index % 6
        if case == 1 and label != "neutral":  # the image says neutral: the text's label stands
            pairs, expected[guid] = [(label, "neutral")] * annotators, label
        elif case == 2:  # positive against negative: dropped
            pairs, expected[guid] = [("positive", "negative")] * annotators, None
        elif case == 3 and annotators == 3:  # annotators all differ on the text: dropped
            pairs, expected[guid] = [("positive", label), ("neutral", label), ("negative", label)], None
        elif case == 4 and annotators == 3:  # two of three agree: their label stands
            other = "neutral" if label != "neutral" else "positive"
            pairs, expected[guid] = [(label, label), (other, label), (label, label)], label
        else:
            pairs, expected[guid] = [(label, label)] * annotators, label
        lines.append(guid + "\t" + "\t".join(f"{t},{i}" for t, i in pairs))
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    return root, expected


def _write_pair(root: Path, guid: str, label: str, rng: np.random.Generator, size: int,
                text: str | None = None) -> None:
    if text is None:
        words = list(rng.choice(CLASS_WORDS[label], size=2)) + list(rng.choice(FILLER_WORDS, size=4))
        rng.shuffle(words)
        text = " ".join(words)
    (root / "data" / f"{guid}.txt").write_text(text + "\n", encoding="utf-8")
    colour = np.array(CLASS_COLOURS[label], dtype=float)
    pixels = colour + rng.normal(0, 25, size=(size, size, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "data" / f"{guid}.jpg", quality=90)


def _write_messy(root: Path, rng: np.random.Generator, size: int) -> list[str]:
    data = root / "data"
    for guid in MESSY:
        _write_pair(root, guid, "positive", rng, size)
    (data / "9001.txt").write_bytes("great day “happy” …".encode("gb18030"))
    (data / "9002.txt").write_bytes("love this café".encode("cp1252"))
    (data / "9003.txt").write_bytes(b"  \n")
    (data / "9004.txt").unlink()
    (data / "9005.jpg").unlink()
    jpeg = (data / "9006.jpg").read_bytes()
    (data / "9006.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (data / "9007.jpg").write_text("this is not a jpeg")
    return [f"{guid},positive" for guid in MESSY]


def make_tiny_text_model(path: Path, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer BERT with a vocabulary of the demo words, saved as an HF directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    words = sorted({w for ws in CLASS_WORDS.values() for w in ws} | set(FILLER_WORDS)
                   | {"caption", "picture", "of", "an", "image"})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden_size * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return Path(path)


def make_tiny_image_weights(path: Path, model: str = "timm:test_efficientnet", seed: int = 0) -> Path:
    """Random weights for an image model, saved as a state dict (what --image-weights takes)."""
    import torch

    torch.manual_seed(seed)
    if model.startswith("timm:"):
        import timm

        net = timm.create_model(model.removeprefix("timm:"), pretrained=False)
    else:
        import torchvision

        net = torchvision.models.get_model(model, weights=None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return Path(path)


def make_tiny_captioner(path: Path, hidden_size: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """A random BLIP captioner of the real architecture, tiny (1 layer each side, 32x32 images),
    saved with its processor as an HF directory. Its captions are random demo words."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    words = sorted({w for ws in CLASS_WORDS.values() for w in ws} | set(FILLER_WORDS))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["[DEC]"] + words)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    torch.manual_seed(seed)
    layers = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=1,
                  num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(image_size=image_size, patch_size=16, initializer_range=0.5, **layers),
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, pad_token_id=vocab["[PAD]"],
                         bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"],
                         encoder_hidden_size=hidden_size, initializer_range=0.5, **layers),
        projection_dim=hidden_size,
    )
    BlipForConditionalGeneration(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor, tokenizer).save_pretrained(path)
    return Path(path)


def make_mosi_pickle(path: Path, sizes: dict[str, int] | None = None, steps: int = 12, seed: int = 0,
                     dims: dict[str, int] | None = None) -> Path:
    """A MultiBench-style pickle (train/valid/test; text, audio, vision [N, T, D]; labels; id)
    whose score in [-3, 3] depends on the text and audio features. Like the real files it
    pads sequences with zero steps at the start and holds -inf values in audio."""
    import pickle

    rng = np.random.default_rng(seed)
    sizes = sizes or {"train": 160, "valid": 48, "test": 48}
    dims = dims or {"text": 12, "audio": 6, "vision": 5}
    data = {}
    for split, n in sizes.items():
        part = {name: rng.normal(size=(n, steps, d)).astype(np.float32) for name, d in dims.items()}
        lengths = rng.integers(steps // 2, steps + 1, size=n)
        for name in dims:
            for i, length in enumerate(lengths):
                part[name][i, : steps - length] = 0.0  # left padding
        signal = part["text"][:, :, 0].sum(1) / lengths + part["audio"][:, :, 1].sum(1) / lengths
        scores = np.clip(np.round(3 * np.tanh(2 * signal), 1), -3, 3)
        part["audio"][rng.random(part["audio"].shape) < 0.01] = -np.inf
        part["labels"] = scores.reshape(n, 1, 1)
        part["id"] = np.array([[f"video{split}{i // 4}", str(i % 4)] for i in range(n)])
        data[split] = part
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return Path(path)


SIGNALS = ("means", "last", "interaction")
MOSEI_LIKE_DIMS = {"text": 300, "audio": 74, "vision": 35}  # MultiBench's MOSI/MOSEI feature sizes
MMSA_MOSI_DIMS = {"text": 768, "audio": 5, "vision": 20}  # MMSA's MOSI files (BERT text)
MMSA_UNALIGNED_STEPS = {"text": 50, "audio": 375, "vision": 500}


def signal_splits(signal: str, sizes: dict[str, int], steps: dict[str, int], dims: dict[str, int], seed: int,
                  noise: float, pad: str) -> dict[str, dict]:
    """Per split: {"features": {m: [N, T_m, D_m]}, "lengths": {m: [N]}, "scores": [N]}, with a score
    planted as make_sequence_signal says; pad "start" (MultiBench) or "end" (MMSA)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    rng = np.random.default_rng(seed)
    offsets = {m: rng.normal(0, 3, size=d) for m, d in dims.items()}
    scales = {m: 10 ** rng.uniform(-2, 2, size=d) for m, d in dims.items()}
    weights = {m: rng.normal(size=3) for m in dims}  # columns 0-2 of each modality carry the signal
    splits = {}
    for split, n in sizes.items():
        share = rng.uniform(0.5, 1.0, size=n)  # each item's length, as a share of every modality's steps
        lengths = {m: np.maximum(3, np.ceil(share * steps[m])).astype(int) for m in dims}
        real = {m: (np.arange(steps[m])[None, :] >= (steps[m] - lengths[m])[:, None]) if pad == "start"
                else (np.arange(steps[m])[None, :] < lengths[m][:, None]) for m in dims}
        # Each item has its own level per column, so the means vary between items.
        raw = {m: rng.normal(size=(n, steps[m], d)) + rng.normal(size=(n, 1, d)) for m, d in dims.items()}
        if signal == "last":  # the mean of the last 3 real steps
            ends = {m: np.full(n, steps[m]) if pad == "start" else lengths[m] for m in dims}
            last = {m: ends[m][:, None] - 3 + np.arange(3)[None, :] for m in dims}
            summary = {m: np.take_along_axis(raw[m][:, :, :3], last[m][..., None], 1).mean(1) for m in dims}
        else:
            summary = {m: (raw[m][:, :, :3] * real[m][..., None]).sum(1) / lengths[m][:, None] for m in dims}
        if signal == "interaction":  # each of two modalities alone, and their product
            first, second = (summary[m] @ weights[m] / np.sqrt(3) for m in list(dims)[:2])
            latent = 0.5 * (first + second) + first * second
        else:
            latent = sum(summary[m] @ weights[m] for m in dims) / np.sqrt(len(dims) * 3)
        scores = np.clip(np.round(1.5 * latent + rng.normal(0, noise, size=n), 2), -3, 3)
        features = {m: ((raw[m] + offsets[m]) * scales[m] * real[m][..., None]).astype(np.float32) for m in dims}
        second_name = list(dims)[1]  # audio in the real files: -inf in a column that carries no signal
        features[second_name][..., -1][(rng.random((n, steps[second_name])) < 0.02) & real[second_name]] = -np.inf
        splits[split] = {"features": features, "lengths": lengths, "scores": scores}
    return splits


def make_sequence_signal(signal: str, sizes: dict[str, int] | None = None, steps: int = 20,
                         dims: dict[str, int] | None = None, seed: int = 0, noise: float = 0.3) -> dict:
    """MultiBench-layout splits ({"train" | "valid" | "test": {text, audio, vision [N, T, D], labels
    [N, 1, 1], id}}) whose score is planted in one of three ways, on features as unscaled as real
    ones (each column with its own offset and a scale from 0.01 to 100, left padding, -inf in audio):

    means: a linear function of the per-modality means of a few columns (what a ridge regression
        on mean-pooled features finds);
    last: the same, of the means over each sequence's last 3 real steps (order matters);
    interaction: a linear function of the text means and one of the audio means, plus their
        product (a linear model finds the first part only).
    """
    sizes = sizes or {"train": 600, "valid": 150, "test": 150}
    dims = dims or MOSEI_LIKE_DIMS
    splits = signal_splits(signal, sizes, {m: steps for m in dims}, dims, seed, noise, pad="start")
    return {split: {**part["features"], "labels": part["scores"].reshape(-1, 1, 1).astype(np.float32),
                    "id": np.array([[f"{split}{i}", "0"] for i in range(len(part["scores"]))])}
            for split, part in splits.items()}


def make_mmsa_pickle(path: Path, aligned: bool = True, sizes: dict[str, int] | None = None,
                     steps: dict[str, int] | None = None, dims: dict[str, int] | None = None, signal: str = "means",
                     seed: int = 0) -> Path:
    """A pickle in MMSA's layout (aligned_50.pkl, or unaligned_50.pkl with audio_lengths and
    vision_lengths): per split id, raw_text, text [N, T, 768], text_bert [N, 3, T] (ids, mask,
    segments), audio, vision, regression_labels [N], classification_labels, annotations;
    sequences padded at the end, with a planted signal (make_sequence_signal's)."""
    import pickle

    sizes = sizes or {"train": 120, "valid": 40, "test": 40}
    dims = dims or MMSA_MOSI_DIMS
    steps = steps or ({m: 50 for m in dims} if aligned else MMSA_UNALIGNED_STEPS)
    if aligned and len(set(steps.values())) != 1:
        raise ValueError("an aligned file has one number of steps for every modality")
    splits = signal_splits(signal, sizes, steps, dims, seed, 0.3, pad="end")
    data = {}
    for split, part in splits.items():
        n, scores = len(part["scores"]), part["scores"]
        text_lengths = part["lengths"]["text"]
        token_mask = (np.arange(steps["text"])[None, :] < text_lengths[:, None]).astype(np.float32)
        ids = np.where(token_mask > 0, np.arange(steps["text"])[None, :] + 100, 0).astype(np.float32)
        entry = {"id": np.array([f"clip{split}{i // 3}$_${i % 3}" for i in range(n)], dtype=object),
                 "raw_text": np.array([f"{WORDS_BY_SIGN[int(np.sign(s)) + 1]} words number {i}"
                                       for i, s in enumerate(scores)], dtype=object),
                 **part["features"],
                 "text_bert": np.stack([ids, token_mask, np.zeros_like(token_mask)], axis=1),
                 "regression_labels": scores.astype(np.float32),
                 "classification_labels": (np.sign(scores) + 1).astype(np.float32),
                 "annotations": np.array(["Negative", "Neutral", "Positive"], dtype=object)[
                     (np.sign(scores) + 1).astype(int)]}
        if not aligned:
            entry["audio_lengths"] = part["lengths"]["audio"]
            entry["vision_lengths"] = part["lengths"]["vision"]
        data[split] = entry
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return Path(path)


WORDS_BY_SIGN = ("sad bad", "plain so-so", "great fun")
