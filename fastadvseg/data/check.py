"""Check a dataset's files before training: every image readable, every mask readable, of its image's size, with
values in ``[0, C)`` or the ignore index. A bad file is a :class:`DataError` naming it.

Cheap enough for VOC-sized data: items are read in parallel threads (Pillow decodes without the GIL), and what an
item's files held is remembered by (path, size, mtime) in memory and in ``<data root>/.fastadvseg-datacheck.json``,
so a resume or a second run reads only files that changed. The cache is written only when every item passed.
Sources without files (the embedded synthetic data) are generated, not read: nothing to check.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["DataError", "CACHE_FILE", "scan_items", "check_items", "check_bundle", "infer_num_classes"]

CACHE_FILE = ".fastadvseg-datacheck.json"
_MEMO: Dict[Tuple, dict] = {}  # (source, id, file stats) -> {"values", "shape"}, for the life of the process


class DataError(ValueError):
    """A data file that cannot be used; the message names it and says what is wrong."""


def _stats(paths: Sequence[str]) -> Tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


def _label_values(label: np.ndarray) -> List[int]:
    if label.size and 0 <= label.min() and label.max() < 1 << 16:
        return np.flatnonzero(np.bincount(label.ravel())).tolist()
    return np.unique(label).tolist()


def _read_item(source, item_id: str) -> dict:
    files = source.files(item_id)
    try:
        image, label = source.load(item_id)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(str(e).strip("'\"")) from None
    if image.shape[:2] != label.shape[:2]:
        raise DataError(f"mask file {files[-1]} is {label.shape[0]}x{label.shape[1]} but its image {files[0]} is "
                        f"{image.shape[0]}x{image.shape[1]}: a mask must have its image's size")
    return {"values": _label_values(label), "shape": list(label.shape[:2])}


def _cache_path(source) -> Optional[str]:
    root = getattr(source, "root", None)
    return os.path.join(root, CACHE_FILE) if root else None


def _read_cache(path: Optional[str], source_name: str) -> Dict[str, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data["items"] if data.get("source") == source_name else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_cache(path: Optional[str], source_name: str, items: Dict[str, dict]) -> None:
    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"source": source_name, "items": items}, f)
        os.replace(tmp, path)
    except OSError:  # a read-only data folder: the check just runs again next time
        try:
            os.unlink(tmp)
        except OSError:
            pass


def scan_items(source, ids: Sequence[str], workers: Optional[int] = None) -> Dict[str, dict]:
    """{id: {"values": the label values of its mask, "shape": [h, w]}} for ``ids``; reads (in parallel) only items whose files are not in the
    in-memory or on-disk cache with the same size and mtime. Unreadable files and size mismatches raise DataError."""
    ids = list(dict.fromkeys(ids))
    cache = _read_cache(_cache_path(source), source.name)
    out, todo, stats = {}, [], {}
    for i in ids:
        stats[i] = _stats(source.files(i))
        key = (source.name, i, stats[i])
        cached = cache.get(i)
        if key in _MEMO:
            out[i] = _MEMO[key]
        elif cached is not None and "shape" in cached and tuple(map(tuple, cached["files"])) == stats[i]:
            out[i] = _MEMO[key] = {"values": cached["values"], "shape": cached["shape"]}
        else:
            todo.append(i)
    if todo:
        pool = ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1))
        try:
            for i, values in zip(todo, pool.map(lambda i: _read_item(source, i), todo)):
                out[i] = _MEMO[(source.name, i, stats[i])] = values
        finally:  # a bad file: the error now, without reading the rest
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _save(source, found: Dict[str, dict]) -> None:
    path = _cache_path(source)
    items = _read_cache(path, source.name)
    for i, v in found.items():
        items[i] = {"files": [list(s) for s in _stats(source.files(i))], **v}
    _write_cache(path, source.name, items)


def check_items(source, ids: Sequence[str], num_classes: int, ignore_index: int = 255,
                workers: Optional[int] = None) -> Dict[str, dict]:
    """Every item of ``ids`` readable, its mask of its image's size with values in [0, num_classes) or
    ``ignore_index``; DataError naming the first bad file. Remembered (see the module doc) once all passed.
    Returns what :func:`scan_items` does."""
    found = scan_items(source, ids, workers)
    bad = [(i, [v for v in f["values"] if not (0 <= v < num_classes or v == ignore_index)]) for i, f in found.items()]
    bad = [(i, vals) for i, vals in bad if vals]
    if bad:
        i, vals = bad[0]
        more = f" ({len(bad) - 1} more masks too, e.g. {source.files(bad[1][0])[-1]})" if len(bad) > 1 else ""
        raise DataError(f"mask file {source.files(i)[-1]} has value(s) {vals[:5]}, but the dataset has {num_classes} "
                        f"classes (0..{num_classes - 1}; {ignore_index} = ignore){more}: fix the masks, or list every "
                        f"class in classes.txt")
    _save(source, found)
    return found


def infer_num_classes(source, ids: Sequence[str], ignore_index: int = 255, where: str = "") -> int:
    """max(mask value other than ``ignore_index``) + 1 over the masks of ``ids``; refuses masks without any class
    and values that cannot be class ids (> 254), naming the file and the values found."""
    values = {i: f["values"] for i, f in scan_items(source, ids).items()}
    found = sorted({v for vals in values.values() for v in vals if v != ignore_index})
    if not found:
        raise DataError(f"every mask in {where or source.name} is all ignore ({ignore_index}); cannot infer the "
                        f"classes: write classes.txt")
    if found[0] < 0 or found[-1] > 254:
        v = found[-1] if found[-1] > 254 else found[0]
        holder = next(i for i, vals in values.items() if v in vals)
        raise DataError(f"mask file {source.files(holder)[-1]} holds value {v}, which cannot be a class id (0..254; "
                        f"{ignore_index} = ignore). Without classes.txt the class count is inferred as the largest "
                        f"mask value + 1; values found: {_abbrev(found)}. Fix the mask, or write classes.txt")
    return found[-1] + 1


def _abbrev(values: List[int], n: int = 12) -> str:
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} values)" if len(values) > n else "")


def _check_val_pad(val, shapes: Dict[str, List[int]]) -> None:
    """With ``val_pad``, every val item (after ``image_size``) must fit in val_pad x val_pad."""
    if not val.val_pad:
        return
    for i, shape in shapes.items():
        h, w = val.image_size or shape
        if max(h, w) > val.val_pad:
            raise DataError(f"val image {(val.source.files(i) or [i])[0]} is {h}x{w}, larger than val_pad={val.val_pad}: "
                            f"give --val_pad {max(h, w)} or more, or --val_pad none (evaluation batch of 1 per size)")


def check_bundle(bundle, log: Callable[[str], None] = print, workers: Optional[int] = None,
                 train: bool = True) -> None:
    """Check every item a run will read (labelled, unlabelled and val; only val without ``train``) before its first
    step."""
    source = bundle.val.source
    if not bundle.val.ids:
        return
    if not source.files(bundle.val.ids[0]):  # generated data: nothing on disk to read; the val items' size matters
        _check_val_pad(bundle.val, {bundle.val.ids[0]: list(source.load(bundle.val.ids[0])[1].shape)})
        return
    ids = {"train": [], "val": list(bundle.val.ids)}
    for ds in (bundle.labelled, bundle.unlabelled) if train else ():
        if ds is not None:
            ids["train"] += list(ds.ids)
    t0 = time.perf_counter()
    found = check_items(source, ids["train"] + ids["val"], bundle.num_classes, bundle.ignore_index, workers)
    _check_val_pad(bundle.val, {i: found[i]["shape"] for i in ids["val"]})
    log(f"data checked: {len(ids['train'])} train + {len(ids['val'])} val items readable, masks of their image's "
        f"size with values in 0..{bundle.num_classes - 1} or {bundle.ignore_index} ({time.perf_counter() - t0:.1f} s)")
