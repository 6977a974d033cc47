"""HDF5 files that keep all their data inside themselves.

HDF5 can point out of a file: an external link names another file, a dataset with external
storage keeps its bytes in raw files named by path, and a virtual dataset maps other files'
datasets. Reading such a file reads whatever those paths hold, so msa refuses every one of
them, in its own sets and in imports alike, by name.
"""

from __future__ import annotations

import h5py

MAX_DEPTH = 32  # groups nest a few levels in any file msa reads; hard-link cycles end here


def outside_storage(group: h5py.Group, depth: int = 0) -> str | None:
    """Where `group` (a file, or a group in one) reaches out of its file, or None."""
    if depth > MAX_DEPTH:
        return f"{group.name}: groups nested over {MAX_DEPTH} deep (a cycle of links?)"
    for name in group:
        link = group.get(name, getlink=True)
        path = f"{group.name.rstrip('/')}/{name}"
        if isinstance(link, h5py.ExternalLink):
            return f"{path} is an external link to {link.filename}"
        if isinstance(link, h5py.SoftLink):
            continue  # a path inside this file, checked where its target lies
        item = group.get(name)
        if isinstance(item, h5py.Group):
            problem = outside_storage(item, depth + 1)
            if problem:
                return problem
        elif isinstance(item, h5py.Dataset):
            if item.is_virtual:
                return f"{path} is a virtual dataset (its data lie in other files)"
            if item.external:
                return f"{path} keeps its data in an external file ({item.external[0][0]!r})"
    return None


def refusal(path, problem: str) -> str:
    return f"{path}: {problem}; msa reads only data inside the files it was given"
