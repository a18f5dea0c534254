"""Load pretrained segmenter weights from a LOCAL file (nothing is downloaded), and say what loaded.

Two key layouts are understood and mapped onto :class:`~fastadvseg.models.deeplab.DeepLabV2`:

* torchvision's ImageNet ResNet (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``, ...; ``fc.*``
  skipped): backbone only, the head stays freshly initialised;
* the authors' DeepLab / MS-COCO init (``resnet101COCO-41f33a49.pth``: ``Scale.conv1.weight``, ...,
  ``Scale.layer5.conv2d_list.0.weight``), also without the ``Scale.`` prefix (their trained snapshots):
  ``layer5.conv2d_list.i`` becomes ``classifier.branches.i``.

Our own checkpoints (``backbone.*``, ``classifier.*``, or a training checkpoint with a ``"G"`` entry) load as is.
A tensor whose shape differs from the model's (e.g. a 21-class head into an 8-class model) is skipped and named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

_PREFIXES = ("module.", "Scale.")

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
# Weights shipped in the package (no download), per segmenter: file in PRETRAINED_DIR, its SHA-256. Made by the command
# recorded in the JSON file beside it (python -m fastadvseg.pretrain; see fastadvseg/pretrain.py).
SHIPPED = {
    "deeplabv2_compact": ("compact_synthetic.pt", "67db3b6f8843bdaefa0d9f9ed7e5a95586ff24c22bc9ec4b8496bbce7c5447cf"),
}


def sha256_file(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_weights(model: str, check: bool = True) -> str:
    """The path of the weights shipped for ``model``, its SHA-256 checked against the recorded one (``check``)."""
    if model not in SHIPPED:
        raise KeyError(f"no pretrained weights are shipped for model {model} (only for {', '.join(SHIPPED)})")
    name, digest = SHIPPED[model]
    path = os.path.join(PRETRAINED_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the shipped weights {path} are missing from this installation (reinstall fastadvseg)")
    if check and sha256_file(path) != digest:
        raise ValueError(f"the shipped weights {path} do not have their recorded SHA-256 {digest[:12]}...: the file "
                         f"is damaged or was replaced (reinstall fastadvseg)")
    return path


@dataclass
class LoadReport:
    path: str
    layout: str
    loaded: List[str] = field(default_factory=list)  # model keys filled from the file
    missing: List[str] = field(default_factory=list)  # model keys the file lacks (kept as initialised)
    unexpected: List[str] = field(default_factory=list)  # file keys with no place in the model (incl. fc.*)
    # (model key, file shape, model shape): in the file but skipped, kept as initialised
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"pretrained weights {self.path} ({self.layout} layout): loaded {len(self.loaded)} tensors, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unused, {len(self.mismatched)} shape mismatches"]
        for key, got, want in self.mismatched:
            lines.append(f"  skipped {key}: file has shape {list(got)}, model needs {list(want)}")
        if self.missing:
            lines.append("  missing (kept as initialised): " + _abbrev(self.missing))
        if self.unexpected:
            lines.append("  unused from the file: " + _abbrev(self.unexpected))
        return "\n".join(lines)


def _abbrev(keys: List[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path} (weights are never downloaded)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("G", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("backbone.", "classifier.", "module.backbone.")) for k in keys):
        return "fastadvseg"
    if any(k.startswith("Scale.") or ".conv2d_list." in k or k.startswith("layer5.") for k in keys):
        return "deeplab"
    return "torchvision"


def map_key(key: str, layout: str) -> Optional[str]:
    """File key -> model key (None: no place in the model)."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if layout == "fastadvseg":
        return key
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key.startswith("layer5.conv2d_list."):
        return "classifier.branches." + key[len("layer5.conv2d_list."):]
    return "backbone." + key


def load_pretrained(model: nn.Module, path: str) -> LoadReport:
    """Copy every tensor of ``path`` that has a place of the same shape in ``model``; return the report."""
    state = read_state_dict(path)
    layout = detect_layout(state)
    report = LoadReport(path=path, layout=layout)
    own = model.state_dict()
    new = {}
    for key, tensor in state.items():
        target = map_key(key, layout)
        if target is None or target not in own:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[target].shape):
            report.mismatched.append((target, tuple(tensor.shape), tuple(own[target].shape)))
        else:
            new[target] = tensor
    with torch.no_grad():
        for key, tensor in new.items():
            own[key].copy_(tensor)
    report.loaded = sorted(new)
    skipped = {k for k, _, _ in report.mismatched}
    report.missing = [k for k in own if k not in new and k not in skipped and not k.endswith("num_batches_tracked")]
    return report
