"""PNG figures of a run (matplotlib, Agg): loss curves (window means and their trend, labelled axes), validation mIoU
on a fixed 0-100 axis, and predictions with a class legend and the confidence map that chooses the pseudo-labels (D's,
or in the selftrain and mean_teacher modes the network's own max softmax) on a colour scale with its threshold
marked."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


LOSS_KEYS = (("loss_ce", "L_ce"), ("loss_adv", "L_adv (labelled)"), ("loss_semi_adv", "L_adv (unlabelled)"),
             ("loss_semi", "L_semi"), ("loss_cutmix", "L_cutmix (mean teacher)"), ("loss_d", "L_D"))


def _smooth(values: List[float], n: int) -> List[float]:
    """Running mean over the last ``n`` points (the trend through noisy window means)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def loss_figure(records: List[Dict]):
    """One panel per loss: the logged means over each log window (thin) and their running mean (thick); None if
    there are no train records."""
    plt = _plt()
    train = [r for r in records if r.get("kind") == "train"]
    keys = [(k, label) for k, label in LOSS_KEYS if any(r.get(k) is not None for r in train)]
    if not keys:
        return None
    window = max((r.get("window", 1) for r in train), default=1)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        n = max(1, len(values) // 10)
        ax.plot(steps, values, lw=0.6 if n > 1 else 1.2, alpha=0.45 if n > 1 else 1.0, label=f"mean of {window} steps")
        if n > 1:
            ax.plot(steps, _smooth(values, n), lw=1.6, label=f"running mean of {n} points")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return fig


def miou_figure(records: List[Dict]):
    """Validation mIoU (%) against step on a fixed 0-100 axis (small changes look small), best point marked;
    None without val records."""
    plt = _plt()
    val = [r for r in records if r.get("kind") == "val" and r.get("miou") is not None]
    if not val:
        return None
    steps, miou = [r["step"] for r in val], [100 * r["miou"] for r in val]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(steps, miou, "o-", ms=3)
    k = max(range(len(miou)), key=miou.__getitem__)
    ax.annotate(f"best {miou[k]:.2f} (step {steps[k]})", (steps[k], miou[k]), textcoords="offset points",
                xytext=(0, 8), ha="center", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_xlim(0, max(steps) * 1.05 + 1)
    ax.set_xlabel("step")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(records: List[Dict], out_dir: str) -> List[str]:
    """``losses.png`` and ``miou.png`` from metrics.jsonl records; returns the paths written."""
    plt = _plt()
    written = []
    for name, fig in (("losses.png", loss_figure(records)), ("miou.png", miou_figure(records))):
        if fig is not None:
            written.append(os.path.join(out_dir, name))
            fig.savefig(written[-1], dpi=100)
            plt.close(fig)
    return written


def samples_figure(images, labels, preds, confidence, palette, mean, std, class_names: Sequence[str],
                   threshold: float, ignore_index: int = 255, titles: Optional[List[str]] = None,
                   confidence_name: str = "D confidence", confidence_label: str = "sigmoid(D)",
                   threshold_name: str = "T_semi"):
    """One row per image: input, ground truth, prediction, and a confidence map - by default sigmoid(D(softmax(pred))),
    the "trustworthy regions" that L_semi keeps where the confidence exceeds T_semi (``threshold``: outlined, and
    marked on the colour scale; ``confidence_name``, ``confidence_label``, ``threshold_name`` name another map and its
    threshold). A legend names the classes shown."""
    from matplotlib.patches import Patch

    from ..data import colorize, denormalize

    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(9, 2.1 * n + 0.9), squeeze=False)
    shown = set()
    for i in range(n):
        conf = confidence[i].float().cpu().numpy()
        panels = [denormalize(images[i], mean, std), colorize(labels[i], palette, ignore_index),
                  colorize(preds[i], palette, ignore_index)]
        names = ["image" + (f" {titles[i]}" if titles else ""), "ground truth", "prediction"]
        for ax, panel, name in zip(axes[i], panels, names):
            ax.imshow(panel)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        shown |= {int(v) for t in (labels[i], preds[i]) for v in t.unique().tolist()}
        im = axes[i][3].imshow(conf, cmap="viridis", vmin=0, vmax=1)
        if conf.min() < threshold < conf.max():
            axes[i][3].contour(conf, levels=[threshold], colors="white", linewidths=0.7)
        axes[i][3].set_title(f"{confidence_name} (white: {threshold_name}={threshold:g})", fontsize=8)
        axes[i][3].axis("off")
        bar = fig.colorbar(im, ax=axes[i][3], fraction=0.046, pad=0.04)
        bar.ax.axhline(threshold, color="white", lw=1.5)
        bar.ax.tick_params(labelsize=6)
        bar.set_label(confidence_label, fontsize=6)
    handles = [Patch(facecolor=[c / 255 for c in palette[k]], edgecolor="black", lw=0.3, label=class_names[k])
               for k in sorted(shown) if k < len(class_names)]
    if ignore_index in shown:
        handles.append(Patch(facecolor="white", edgecolor="black", lw=0.3, label=f"ignore ({ignore_index})"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.9 / (2.1 * n + 0.9), 1, 1))
    return fig


def plot_samples(images, labels, preds, confidence, palette, mean, std, path: str, ignore_index: int = 255,
                 titles: Optional[List[str]] = None, class_names: Optional[Sequence[str]] = None,
                 threshold: float = 0.2, **names) -> str:
    """``samples.png``: see :func:`samples_figure` (``names``: its confidence_name, confidence_label,
    threshold_name)."""
    plt = _plt()
    classes = list(class_names) if class_names is not None else [f"class {k}" for k in range(len(palette))]
    fig = samples_figure(images, labels, preds, confidence, palette, mean, std, classes, threshold, ignore_index, titles,
                         **names)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
