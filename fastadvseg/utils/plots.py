"""PNG figures of a run (matplotlib, Agg): loss curves, validation mIoU, and predictions with D's confidence map."""
from __future__ import annotations

import os
from typing import Dict, List, Optional


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


LOSS_KEYS = (("loss_ce", "L_ce"), ("loss_adv", "L_adv (labelled)"), ("loss_semi_adv", "L_adv (unlabelled)"),
             ("loss_semi", "L_semi"), ("loss_d", "L_D"))


def plot_curves(records: List[Dict], out_dir: str) -> List[str]:
    """``losses.png`` (one panel per loss) and ``miou.png`` from metrics.jsonl records; returns the paths written."""
    plt = _plt()
    written = []
    train = [r for r in records if r.get("kind") == "train"]
    keys = [(k, label) for k, label in LOSS_KEYS if any(r.get(k) is not None for r in train)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, (key, label) in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "losses.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    val = [r for r in records if r.get("kind") == "val" and r.get("miou") is not None]
    if val:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([r["step"] for r in val], [100 * r["miou"] for r in val], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("val mIoU (%)")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "miou.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def plot_samples(images, labels, preds, confidence, palette, mean, std, path: str, ignore_index: int = 255,
                 titles: Optional[List[str]] = None) -> str:
    """One row per image: input, ground truth, prediction, and sigmoid(D(softmax(pred))) - the "trustworthy
    regions" that L_semi keeps where the confidence exceeds T_semi."""
    from ..data import colorize, denormalize

    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    for i in range(n):
        panels = [denormalize(images[i], mean, std), colorize(labels[i], palette, ignore_index),
                  colorize(preds[i], palette, ignore_index), confidence[i].float().cpu().numpy()]
        names = ["image" + (f" {titles[i]}" if titles else ""), "ground truth", "prediction", "D confidence"]
        for j, (ax, panel, name) in enumerate(zip(axes[i], panels, names)):
            ax.imshow(panel, cmap="viridis" if j == 3 else None, vmin=0 if j == 3 else None, vmax=1 if j == 3 else None)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
