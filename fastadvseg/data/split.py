"""The labelled / unlabelled split of the training ids: drawn from a seed, saved with the run, reusable.

File format (``save_split``): JSON ``{"labelled": [ids...], "unlabelled": [ids...], ...}``; extra keys
(dataset, seed, fraction) are informative only. ``load_split`` accepts that JSON, or a plain text file
of labelled ids (one per line) - then "unlabelled" is filled in by ``resolve_split`` as the remaining ids.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["draw_split", "save_split", "load_split", "resolve_split"]


def draw_split(train_ids: Sequence[str], *, labelled_fraction: float = 0.125,
               labelled_count: Optional[int] = None, seed: int = 0) -> dict:
    """Draw ``labelled_count`` (else ``round(labelled_fraction * n)``, at least 1) labelled ids with
    ``numpy.random.default_rng(seed)``; the rest are unlabelled. Both lists keep the order of ``train_ids``."""
    ids = list(train_ids)
    n = len(ids)
    if n == 0:
        raise ValueError("no training ids to split")
    if labelled_count is None:
        if not 0.0 < float(labelled_fraction) <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}")
        k = max(1, int(round(float(labelled_fraction) * n)))
    else:
        k = int(labelled_count)
        if not 0 < k <= n:
            raise ValueError(f"labelled_count must be in [1, {n}] (the number of training ids), got {labelled_count}")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:k]] = True
    return {"labelled": [i for i, c in zip(ids, chosen) if c],
            "unlabelled": [i for i, c in zip(ids, chosen) if not c]}


def save_split(split: dict, path, **info) -> None:
    """Write ``split`` as JSON (``{"labelled": [...], "unlabelled": [...]}`` plus ``info`` keys)."""
    path = os.fspath(path)
    data = {"labelled": list(split["labelled"]), "unlabelled": list(split.get("unlabelled") or [])}
    for k, v in {**{k: v for k, v in split.items() if k not in data}, **info}.items():
        data[k] = v
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_split(path) -> dict:
    """Read a split written by ``save_split`` (or a text file of labelled ids; "unlabelled" is then None)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".txt"):
        ids = [line.strip() for line in text.splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"split file {path} lists no ids")
        return {"labelled": ids, "unlabelled": None}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"split file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("labelled"), list):
        raise ValueError(f"split file {path} must hold a JSON object with a list 'labelled'")
    unl = data.get("unlabelled")
    if unl is not None and not isinstance(unl, list):
        raise ValueError(f"split file {path}: 'unlabelled' must be a list")
    if not data["labelled"]:
        raise ValueError(f"split file {path} lists no labelled ids")
    out = dict(data)
    out["labelled"] = [str(i) for i in data["labelled"]]
    out["unlabelled"] = None if unl is None else [str(i) for i in unl]
    return out


def resolve_split(split_file, train_ids: Sequence[str]) -> dict:
    """Load ``split_file`` and check it against the dataset's training ids (error naming the file)."""
    split = load_split(split_file)
    known = set(train_ids)
    lab = split["labelled"]
    unl = split["unlabelled"]
    if unl is None:
        lab_set = set(lab)
        unl = [i for i in train_ids if i not in lab_set]
    unknown = [i for i in list(lab) + list(unl) if i not in known]
    if unknown:
        raise ValueError(f"split file {os.fspath(split_file)} names {len(unknown)} id(s) that are not training ids "
                         f"of this dataset, e.g. {unknown[:3]}")
    both = set(lab) & set(unl)
    if both:
        raise ValueError(f"split file {os.fspath(split_file)} lists {len(both)} id(s) as both labelled and "
                         f"unlabelled, e.g. {sorted(both)[:3]}")
    return {"labelled": list(lab), "unlabelled": list(unl)}
