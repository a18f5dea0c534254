"""Segmentation metrics from a confusion matrix accumulated on the device.

    cm = ConfusionMatrix(num_classes=21, device=logits.device)
    for images, labels, _ in loader:
        cm.update(model(images).argmax(1), labels)
    cm.all_reduce()                      # no-op unless torch.distributed is initialised
    result = cm.compute()
    print(format_table(class_names, result)); json.dump(result.to_dict(class_names), f)

Conventions (those of the PASCAL VOC / Cityscapes benchmarks):

* ``mat[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p``; pixels whose target is
  ``ignore_index`` are not counted.
* IoU_c = TP / (TP + FP + FN). A class absent from both prediction and ground truth has an undefined
  IoU (NaN) and is **excluded** from the mean (mIoU = nanmean), never counted as 0 or 1.
* pixel accuracy = trace / total; class accuracy_c = TP / (TP + FN), NaN for a class absent from the
  ground truth; mean class accuracy = nanmean over classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["ConfusionMatrix", "SegMetrics", "format_table", "metrics_from_matrix"]


@dataclass
class SegMetrics:
    """Results of a confusion matrix. Lists hold one Python float per class (NaN = undefined)."""

    iou: list
    class_acc: list
    miou: float
    pixel_acc: float
    mean_class_acc: float
    num_pixels: int

    def to_dict(self, class_names: Optional[Sequence[str]] = None) -> dict:
        """JSON-ready form: NaN becomes None; per-class values keyed by class name when names are given."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        if len(names) != len(self.iou):
            raise ValueError(f"{len(names)} class names for {len(self.iou)} classes")
        return {
            "miou": _json_float(self.miou),
            "pixel_acc": _json_float(self.pixel_acc),
            "mean_class_acc": _json_float(self.mean_class_acc),
            "num_pixels": int(self.num_pixels),
            "iou": {n: _json_float(v) for n, v in zip(names, self.iou)},
            "class_acc": {n: _json_float(v) for n, v in zip(names, self.class_acc)},
        }


def _json_float(v: float) -> Optional[float]:
    return None if v is None or math.isnan(v) else float(v)


def _nanmean(values: torch.Tensor) -> float:
    valid = ~torch.isnan(values)
    return float(values[valid].mean()) if bool(valid.any()) else float("nan")


def metrics_from_matrix(mat: torch.Tensor) -> SegMetrics:
    """Compute :class:`SegMetrics` from a (C, C) confusion matrix (rows = ground truth, cols = prediction)."""
    m = mat.detach().to("cpu", torch.float64)
    tp = torch.diagonal(m)
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = m.sum()
    return SegMetrics(
        iou=iou.tolist(),
        class_acc=acc.tolist(),
        miou=_nanmean(iou),
        pixel_acc=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_class_acc=_nanmean(acc),
        num_pixels=int(total),
    )


class ConfusionMatrix:
    """A (num_classes, num_classes) int64 confusion matrix ``.mat`` that lives on ``device``.

    ``update`` costs one ``torch.bincount`` on the device; ``all_reduce`` sums ``.mat`` over a
    ``torch.distributed`` process group (DDP evaluation), ``compute`` returns :class:`SegMetrics`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device="cpu", validate: bool = True):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.validate = validate
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer tensors of the same shape, e.g. (N, H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"pred and target must be integer tensors, got {pred.dtype} and {target.dtype}")
        c = self.num_classes
        pred = pred.to(self.mat.device, torch.int64).reshape(-1)
        target = target.to(self.mat.device, torch.int64).reshape(-1)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if self.validate and target.numel():
            bad_t = (target < 0) | (target >= c)
            if bool(bad_t.any()):
                raise ValueError(f"target value {int(target[bad_t][0])} is outside [0, {c}) and is not "
                                 f"ignore_index={self.ignore_index}")
            bad_p = (pred < 0) | (pred >= c)
            if bool(bad_p.any()):
                raise ValueError(f"prediction value {int(pred[bad_p][0])} is outside [0, {c})")
        self.mat += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)

    def all_reduce(self, group=None) -> None:
        """Sum ``.mat`` over all processes when torch.distributed is initialised; otherwise do nothing."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM, group=group)

    def compute(self) -> SegMetrics:
        return metrics_from_matrix(self.mat)


def format_table(class_names: Sequence[str], result: SegMetrics, digits: int = 1) -> str:
    """A Markdown table of per-class IoU and accuracy (percent), with mIoU and pixel accuracy at the bottom.

    Undefined values (class absent from prediction and ground truth) are shown as "–" and excluded
    from the means.
    """
    if len(class_names) != len(result.iou):
        raise ValueError(f"{len(class_names)} class names for {len(result.iou)} classes")

    def pct(v: float) -> str:
        return "–" if math.isnan(v) else f"{100.0 * v:.{digits}f}"

    lines = ["| class | IoU (%) | acc (%) |", "| --- | ---: | ---: |"]
    for name, iou, acc in zip(class_names, result.iou, result.class_acc):
        lines.append(f"| {name} | {pct(iou)} | {pct(acc)} |")
    lines.append(f"| **mean** | **{pct(result.miou)}** | **{pct(result.mean_class_acc)}** |")
    lines.append(f"| pixel accuracy | {pct(result.pixel_acc)} | |")
    return "\n".join(lines)
