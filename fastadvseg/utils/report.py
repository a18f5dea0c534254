"""The run directory, and what a run leaves in it at the end: plots, the per-class table, summary.json."""
from __future__ import annotations

import json
import os
import time

import torch

from ..config import ConfigError
from .distributed import broadcast_object
from .lock import RunLock
from .log import fmt_duration, read_metrics
from .plots import plot_curves, plot_samples


def make_run_dir(cfg, info, existing=None):
    """(``run_root/name`` (default: a timestamp), its RunLock held): chosen on rank 0 and shared. Refuses a directory
    that holds a run (unless it is the ``existing`` run being resumed) or that another process is using."""
    path, lock = existing, RunLock(existing or "")
    if info.is_main:
        if existing is None:
            name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
            path = os.path.join(cfg.run_root, name)
            if cfg.name is None:
                k = 1
                while os.path.exists(path):
                    path, k = os.path.join(cfg.run_root, f"{name}-{k}"), k + 1
            try:
                os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create run directory {path}: {e.strerror or e}") from None
        lock = RunLock(path).acquire()  # before looking inside: a second process started now is refused here
        if existing is None and os.path.exists(os.path.join(path, "checkpoints", "last.pt")):
            lock.release()
            raise ConfigError(f"run directory {path} already holds a run: continue it with --resume {path}, "
                              f"or pick another --name")
    return broadcast_object(path, info), lock


def describe_run(cfg, bundle, G, info, run_dir) -> str:
    """The opening lines: what is trained on what, with which loss backend, where the run is written."""
    from .._dispatch import resolve

    backend = resolve("generator_loss", cfg.loss_backend, info.device, torch.float32)
    n_unl = len(bundle.unlabelled) if bundle.unlabelled is not None else 0
    params = sum(p.numel() for p in G.parameters()) / 1e6
    return (f"{cfg.mode} run of {cfg.model} ({params:.2f}M params, BN {cfg.batchnorm}) on "
            f"{cfg.dataset}: {len(bundle.labelled)} labelled / {n_unl} unlabelled / {len(bundle.val)} val images, "
            f"{cfg.steps} steps of batch {cfg.batch_size}, crop {cfg.crop_size[0]}x{cfg.crop_size[1]}\n"
            f"device {info.device} x{info.world_size}, loss backend {cfg.loss_backend} -> {backend}, amp {cfg.amp}; "
            f"run directory {run_dir}")


def own_confidence(G, images: torch.Tensor, size, cfg) -> torch.Tensor:
    """(N, H, W) max softmax of the segmenter ``G`` (in eval mode) on ``images``, at ``size``."""
    from ..backends.reference import teacher_confidence
    from .builders import autocast, segment

    was_training = G.training
    G.eval()
    with torch.no_grad(), autocast(cfg, images.device):
        confidence, _ = teacher_confidence(segment(G, images, size))
    G.train(was_training)
    return confidence


def final_report(cfg, bundle, G, D, run_dir, info, result, best, wall_s, cpu_s=None, step=None, test=None,
                 teacher=None) -> dict:
    """Rank 0: curves, the prediction/confidence figure, eval.md/json, summary.json; prints the IoU table. ``step``:
    the step of the model reported (that of checkpoints/last.pt); ``test``: its scores on the held-out test split
    (eval_test.md/json, test_miou in summary.json); ``teacher``: mean_teacher mode's EMA teacher, whose confidence
    the figure shows."""
    from ..evaluate import confidence_maps, write_report

    step = cfg.steps if step is None else step
    summary = {"run_dir": run_dir, "step": step, "interrupted": False, "miou": result.miou,
               "pixel_acc": result.pixel_acc, "best_miou": best, "wall_s": wall_s,
               "cpu_s": cpu_s, "threads": torch.get_num_threads()}
    if test is not None:
        summary.update(test_miou=test.miou, test_pixel_acc=test.pixel_acc, test_images=len(bundle.test))
    if not info.is_main:
        return summary
    if cfg.plots:
        plot_curves(read_metrics(os.path.join(run_dir, "metrics.jsonl")), run_dir)
        n = min(cfg.num_vis_images, len(bundle.val))
        if n:
            items = [bundle.val[i] for i in range(n)]
            shape = items[0][0].shape
            items = [it for it in items if it[0].shape == shape]
            images = torch.stack([it[0] for it in items]).to(info.device)
            labels = torch.stack([it[1] for it in items])
            size = tuple(labels.shape[-2:])
            preds, conf = confidence_maps(G, D, images, size, cfg)
            shown = {"threshold": cfg.semi_threshold}
            if cfg.mode in ("selftrain", "mean_teacher"):  # the map that chooses these modes' pseudo-labels
                net = teacher if cfg.mode == "mean_teacher" and teacher is not None else G
                conf = own_confidence(net, images, size, cfg)
                who = "teacher" if net is teacher else "G"
                shown = {"threshold": cfg.teacher_threshold if cfg.mode == "mean_teacher" else cfg.selftrain_threshold,
                         "confidence_name": f"{who} max softmax", "confidence_label": "max softmax",
                         "threshold_name": "tau"}
            plot_samples(images, labels, preds, conf, bundle.palette, bundle.mean, bundle.std,
                         os.path.join(run_dir, "samples.png"), ignore_index=cfg.ignore_index, titles=[it[2] for it in items],
                         class_names=bundle.class_names, **shown)
    table = write_report(result, bundle.class_names, run_dir, extra={"step": step})
    if test is not None:
        write_report(test, bundle.class_names, run_dir, stem="eval_test", extra={"step": step, "split": "test"})
    path = os.path.join(run_dir, "summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:  # replaced atomically: it marks a finished run
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    print(table)
    print(f"mIoU {100 * result.miou:.2f} (best {100 * (best or 0):.2f})  pixel accuracy {100 * result.pixel_acc:.2f}  "
          f"wall time {fmt_duration(wall_s)} (CPU time {fmt_duration(cpu_s or 0)})  run directory {run_dir}", flush=True)
    if test is not None:
        print(f"held-out test split ({len(bundle.test)} images, final model): mIoU {100 * test.miou:.2f}  pixel accuracy "
              f"{100 * test.pixel_acc:.2f}", flush=True)
    return summary

