"""Checkpoints a user can trust: complete (models, optimisers, step, RNG states, best mIoU), written atomically, and
checked before use.

``atomic_save`` writes to a temporary file in the destination's directory, flushes and fsyncs it, then
``os.replace``-s it over the destination (and fsyncs the directory): a crash or a kill at any moment leaves either
the previous file or the new one, never a torn one (``remove_stale_temp_files`` clears the temp files of killed
writes when a run starts).

Before a checkpoint is used (``read_checkpoint``, ``read_training_state``, ``check_resume``): it must load with
``torch.load(weights_only=True)`` (a damaged file is named, with what is wrong), hold a full training state with finite
values, come from a run of the same settings (its config, minus the settings in ``RESUMABLE``) and the same classes.
"""
from __future__ import annotations

import math
import os
import re
import random
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError

LAST = "last.pt"
BEST = "best.pt"
# what a training checkpoint holds (training_state)
STATE_KEYS = ("step", "G", "D", "opt_g", "opt_d", "rng", "config")
# settings that may change when a run is resumed: none changes what its checkpoint means (how long to train, how
# often to log/evaluate/save, where the data and outputs are, how fast). Any other change is refused.
RESUMABLE = ("steps", "log_every", "eval_every", "checkpoint_every", "eval_batch_size", "num_vis_images", "plots",
             "tensorboard", "num_workers", "num_threads", "device", "loss_backend", "channels_last", "data_root",
             "pretrained", "pretrained_d", "name", "run_root", "split_file", "eval_test", "allocator")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, not a training state, or of another run; the message names it."""


def atomic_save(obj: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def rng_state() -> Dict[str, Any]:
    # numpy's key array as a tensor: the checkpoint then holds only tensors and plain types and loads with
    # torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def describe_damage(path: str, error: BaseException) -> str:
    """What is wrong with a file torch.load refused, in words (never torch's advice to load it unsafely)."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if unsafe:
        return (f"it holds Python objects ({unsafe.group(1)}) besides tensors and plain values; a safe load refuses "
                f"them, and loading it unsafely could run code")
    return f"its {size} bytes are not a complete torch checkpoint (truncated, overwritten or another kind of file)"


def read_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a missing or damaged file is a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure to read is damage, reported as such
        reason = describe_damage(path, e)
        what = "cannot be loaded safely" if reason.startswith("it holds") else "is damaged"
        raise CheckpointError(f"checkpoint {path} {what}: {reason}") from None


def first_non_finite(tensors: Dict[str, Any], prefix: str = "") -> Optional[str]:
    """The name of the first floating-point tensor in a (nested) dict with a NaN or infinity; None if all are finite."""
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found = first_non_finite(value, name + ".")
            if found:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def read_training_state(path: str) -> Dict[str, Any]:
    """A checkpoint written by ``fastadvseg.train``, checked: complete, with finite weights."""
    state = read_checkpoint(path)
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        what = "a bare state_dict" if isinstance(state, dict) and all(
            isinstance(v, torch.Tensor) for v in state.values()) else f"a {type(state).__name__}"
        raise CheckpointError(f"checkpoint {path} holds no training state (it is {what}, without "
                              f"{', '.join(map(repr, missing))}): --resume needs a checkpoint written by "
                              f"python -m fastadvseg.train")
    bad = first_non_finite({"G": state["G"], "D": state["D"] or {}, "teacher": state.get("teacher") or {}})
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad}): it cannot be resumed; "
                              f"resume from an earlier checkpoint or start a new run")
    return state


def config_differences(config: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{key: (value in config, value in other)} for the keys that differ and are not in RESUMABLE. A key one side
    lacks (a config written before the setting existed) counts as the value that version ran with (the default, or
    config.ADDED_SINCE); a key of an earlier version counts as the setting that replaced it."""
    from ..config import ADDED_SINCE, TrainConfig, with_current_keys

    config, other = with_current_keys(config), with_current_keys(other)
    defaults = {**TrainConfig().to_dict(), **ADDED_SINCE}
    return {k: (config.get(k), other.get(k)) for k in sorted(set(config) | set(other))
            if k not in RESUMABLE and _norm(config.get(k, defaults.get(k))) != _norm(other.get(k, defaults.get(k)))}


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def check_resume(config: Dict[str, Any], state: Dict[str, Any], path: str) -> Dict[str, Tuple[Any, Any]]:
    """Settings of a resumed run (``config``) against its checkpoint: returns the changed RESUMABLE settings
    {key: (old, new)}; any other change, or fewer steps than the checkpoint has done, is a CheckpointError."""
    saved = state["config"]
    refused = config_differences(saved, config)
    if refused:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise CheckpointError(
            f"cannot resume {path} with {what}: that changes what the checkpoint means. Only "
            f"{', '.join(RESUMABLE[:9])}, ... may change on resume; start a new run (another --name) for new settings")
    if config["steps"] < state["step"]:
        raise CheckpointError(f"cannot resume {path} with steps {config['steps']}: the checkpoint is already at step "
                              f"{state['step']} (give --steps {state['step']} or more; evaluate it with "
                              f"python -m fastadvseg.evaluate --run RUN)")
    return {k: (saved.get(k), config[k]) for k in RESUMABLE
            if k in config and k not in ("name", "run_root", "split_file") and _norm(saved.get(k)) != _norm(config[k])}


def check_data_fits(state: Dict[str, Any], class_names, path: str) -> None:
    """The checkpoint was trained on these classes (checkpoints without the record: the D input width)."""
    saved = state.get("classes")
    if saved is None and isinstance(state.get("D"), dict):
        w = next(iter(state["D"].values()), None)
        saved = None if w is None or w.dim() != 4 else [None] * int(w.shape[1])
    if saved is not None and (len(saved) != len(class_names) or
                              any(a is not None and a != b for a, b in zip(saved, class_names))):
        raise CheckpointError(f"checkpoint {path} was trained on {len(saved)} classes, the data now have "
                              f"{len(class_names)} ({', '.join(class_names[:6])}{', ...' if len(class_names) > 6 else ''}"
                              f"): check data_root and classes.txt, or start a new run")


def recorded_miou(path: str) -> Optional[float]:
    """The val mIoU a best.pt was saved for (None if absent or unreadable); memory-mapped, so cheap."""
    try:
        state = read_checkpoint(path, mmap=True)
    except CheckpointError:
        return None
    value = state.get("val_miou", state.get("best_miou")) if isinstance(state, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def remove_stale_temp_files(run_dir: str) -> List[str]:
    """Temp files of writes killed midway (``.last.pt.XXXX.tmp``, ``metrics.jsonl.tmp``, ...): removed; returns them."""
    removed = []
    for d in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.endswith(".tmp") and os.path.isfile(os.path.join(d, f)):
                    os.unlink(os.path.join(d, f))
                    removed.append(os.path.join(d, f))
    return removed


def resolve_checkpoint(path: str) -> str:
    """A run directory -> its ``checkpoints/last.pt``; a file -> itself."""
    if os.path.isdir(path):
        for cand in (os.path.join(path, "checkpoints", LAST), os.path.join(path, LAST)):
            if os.path.isfile(cand):
                return cand
        raise CheckpointError(f"no checkpoint in {path} (expected {os.path.join(path, 'checkpoints', LAST)}): "
                              f"nothing to resume; a run saves one every checkpoint_every steps")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (give a run directory or a checkpoint file)")
    return path


def run_dir_of(checkpoint_path: str) -> str:
    """``RUN/checkpoints/last.pt`` -> ``RUN``."""
    d = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(d) if os.path.basename(d) == "checkpoints" else d


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(step: int, G, D, opt_g, opt_d, scalers: Dict[str, Any], best_miou: Optional[float],
                   config: Dict[str, Any], extra: Optional[Dict[str, Any]] = None, teacher=None) -> Dict[str, Any]:
    """Everything needed to continue exactly: ``step`` is the next step to run. ``teacher``: the EMA teacher of
    mean_teacher mode (saved as "teacher" when given)."""
    return {
        "step": step,
        "G": unwrap(G).state_dict(),
        "D": unwrap(D).state_dict() if D is not None else None,
        **({"teacher": teacher.state_dict()} if teacher is not None else {}),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict() if opt_d is not None else None,
        "scalers": {k: s.state_dict() for k, s in scalers.items() if s is not None},
        "best_miou": best_miou,
        "rng": rng_state(),
        # batches and augmentation derive from (seed, step) alone (fastadvseg/utils/sampling.py): this is the
        # whole data-order state.
        "sampler": {"seed": config.get("seed"), "next_step": step, "batch_size": config.get("batch_size")},
        "config": config,
        **(extra or {}),
    }


def restore_training_state(state: Optional[Dict[str, Any]], G, D, opt_g, opt_d, scalers: Dict[str, Any],
                           path: str = "checkpoint", teacher=None):
    """Load a :func:`training_state` into freshly built objects (``teacher``: mean_teacher mode's EMA teacher, which
    the checkpoint must then hold); returns (next step, best mIoU) - (0, None) if none."""
    if state is None:
        return 0, None
    if teacher is not None and not isinstance(state.get("teacher"), dict):
        raise CheckpointError(f"checkpoint {path} holds no mean teacher (\"teacher\"), which its mode mean_teacher "
                              f"needs to continue: resume a checkpoint written by this run")
    try:
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        unwrap(G).load_state_dict(state["G"])
        unwrap(D).load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit the networks of its config "
                              f"({first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__})"
                              ) from None
    for name, scaler in scalers.items():
        if scaler is not None and name in state["scalers"]:
            scaler.load_state_dict(state["scalers"][name])
    set_rng_state(state["rng"])
    return state["step"], state["best_miou"]
