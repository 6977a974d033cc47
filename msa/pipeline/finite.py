"""Numbers msa writes or reads must be finite: a NaN or an inf is named with its rows, never passed on."""

from __future__ import annotations

import numpy as np

SHOWN = 5  # rows named in the message


class NonFiniteError(ValueError):
    """Values that are NaN or infinite where numbers must be finite; the message names where."""


def non_finite_rows(values) -> np.ndarray:
    """Indices of the rows (first axis) holding a NaN or an inf."""
    array = values.detach().cpu().float().numpy() if hasattr(values, "detach") else np.asarray(values)
    if array.dtype.kind not in "fc" or array.size == 0:
        return np.zeros(0, dtype=int)
    finite = np.isfinite(array)
    return np.flatnonzero(~finite.reshape(len(array), -1).all(1)) if array.ndim else np.flatnonzero(~finite[None])


def require_finite(values, what: str, names: list | None = None) -> None:
    """Raise NonFiniteError naming `what` and the first bad rows (by `names`, e.g. guids) if any value is not finite."""
    bad = non_finite_rows(values)
    if len(bad):
        shown = [str(names[i]) if names is not None else str(i) for i in bad[:SHOWN]]
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        label = "guids" if names is not None else "rows"
        raise NonFiniteError(f"{what}: NaN or infinite values in {len(bad)} row(s) ({label} {', '.join(shown)}{more})")
