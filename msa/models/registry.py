"""The fusion heads by name (timm's pattern): a head module registers its classes with
`@register_head(NAME)`; msa/models/__init__.py imports every head module, so the table is full
whoever asks. `create_head` is the one place a head is built."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from msa.core.config import ConfigError

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return add


def create_head(name: str, dims: dict, num_classes: int, hidden: int = 256,
                dropout: float = 0.1, **options) -> nn.Module:
    """The one place heads are built; num_classes 1 is a regression score. `options` are run
    options (e.g. sequence_encoder); each head takes those it declares in its `options`."""
    cls = HEADS[check_head(name)]
    return cls(dims, num_classes, hidden, dropout, **{k: options[k] for k in cls.options if k in options})


def check_head(name: str, modalities: list[str] | None = None) -> str:
    """The head's name if it exists and (given the modalities it would read) has enough of them."""
    if name not in HEADS:
        import difflib

        close = difflib.get_close_matches(name, list(HEADS), n=1)
        raise ConfigError(f"unknown fusion head {name!r}; known: {', '.join(sorted(HEADS))}"
                          f"{f'; did you mean {close[0]}?' if close else ''}")
    needed = HEADS[name].min_modalities
    if modalities is not None and len(modalities) < needed:
        raise ConfigError(f"--fusion {name} needs {needed} modalities and the run reads "
                          f"{len(modalities)} ({', '.join(modalities) or 'none'}); choose another head or "
                          "extract the missing modality")
    return name


def modality_warnings(name: str, modalities: list[str]) -> list[str]:
    """A head built to fuse modalities that reads only one: it trains, and is a one-modality model."""
    if HEADS[name].fuses and len(modalities) == 1:
        return [f"--fusion {name} fuses modalities but this run reads only {modalities[0]}: it is a one-modality "
                f"model; extract another modality (msa extract --modalities) or choose --fusion text-only or linear"]
    return []
