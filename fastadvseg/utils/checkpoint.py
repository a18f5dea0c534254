"""Checkpoints a user can trust: complete (models, optimisers, step, RNG states, best mIoU) and written atomically.

``atomic_save`` writes to a temporary file in the destination's directory, flushes and fsyncs it, then
``os.replace``-s it over the destination (and fsyncs the directory): a crash or a kill at any moment leaves either
the previous file or the new one, never a torn one.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

LAST = "last.pt"
BEST = "best.pt"


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


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint (tensors and plain types only: loads with ``weights_only=True``)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", LAST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def resolve_checkpoint(path: str) -> str:
    """A run directory -> its ``checkpoints/last.pt``; a file -> itself."""
    if os.path.isdir(path):
        for cand in (os.path.join(path, "checkpoints", LAST), os.path.join(path, LAST)):
            if os.path.isfile(cand):
                return cand
        raise FileNotFoundError(f"no checkpoint in run directory {path} (expected checkpoints/{LAST})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def run_dir_of(checkpoint_path: str) -> str:
    """``RUN/checkpoints/last.pt`` -> ``RUN``."""
    d = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(d) if os.path.basename(d) == "checkpoints" else d


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(step: int, G, D, opt_g, opt_d, scalers: Dict[str, Any], best_miou: Optional[float],
                   config: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything needed to continue exactly: ``step`` is the next step to run."""
    return {
        "step": step,
        "G": unwrap(G).state_dict(),
        "D": unwrap(D).state_dict() if D is not None else None,
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


def restore_training_state(state: Optional[Dict[str, Any]], G, D, opt_g, opt_d, scalers: Dict[str, Any]):
    """Load a :func:`training_state` into freshly built objects; returns (next step, best mIoU) - (0, None) if none."""
    if state is None:
        return 0, None
    unwrap(G).load_state_dict(state["G"])
    unwrap(D).load_state_dict(state["D"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    for name, scaler in scalers.items():
        if scaler is not None and name in state["scalers"]:
            scaler.load_state_dict(state["scalers"][name])
    set_rng_state(state["rng"])
    return state["step"], state["best_miou"]
