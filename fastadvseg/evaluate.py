"""Evaluate a segmenter: confusion matrix on the device, per-class IoU, mIoU (absent classes excluded), pixel accuracy.

    python -m fastadvseg.evaluate --run runs/NAME                 # its config and best.pt (else last.pt)
    python -m fastadvseg.evaluate --run runs/NAME --which last --split test   # the final model on the test split

With ``--run`` the best usable checkpoint is used and named: best.pt, or last.pt when best.pt is missing, damaged
or holds non-finite weights (said as a warning). A run without checkpoints, like any other bad input, is one line
``error: ...`` and exit code 2.
    python -m fastadvseg.evaluate --checkpoint G.pt --config voc_1_8 --data_root /data/VOCdevkit

VOC protocol: single scale; with ``val_pad`` (505 in the VOC configs) images are padded bottom/right so they batch,
the padded label pixels are ``ignore`` and predictions are cropped back to the label's original extent before
scoring. Under torchrun every rank scores its share of the images and the confusion matrices are summed, so the
numbers equal those of one process.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, Sequence

import torch

import fastadvseg as fas

from .config import (ConfigError, TrainConfig, build_parser, from_dict, load_config, parse_overrides, read_config_file,
                     require_pipeline_extras)
from .metrics import ConfusionMatrix, SegMetrics, format_table
from .utils import allocator
from .utils import distributed as dist_utils
from .utils.builders import (at_size, autocast, build_bundle, build_segmenter_for_eval, check_data, d_input, segment,
                             to_device)
from .utils.checkpoint import BEST, LAST, CheckpointError, first_non_finite, read_checkpoint


def _batches(dataset, indices: Sequence[int], batch_size: int):
    """Items grouped into batches of equal-shaped images (different shapes go one by one)."""
    group: List = []
    for i in indices:
        item = dataset[i]
        if group and (len(group) == batch_size or group[0][0].shape != item[0].shape):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _valid_extent(label: torch.Tensor, ignore_index: int):
    """(h, w) of the label without the bottom/right ignore padding added by val_pad."""
    keep = label != ignore_index
    rows = torch.nonzero(keep.any(1)).flatten()
    cols = torch.nonzero(keep.any(0)).flatten()
    if rows.numel() == 0:
        return label.shape[-2:]
    return int(rows[-1]) + 1, int(cols[-1]) + 1


@torch.no_grad()
def evaluate(G, dataset, num_classes: int, *, device, batch_size: int = 1, cfg: Optional[TrainConfig] = None,
             info: Optional[dist_utils.DistInfo] = None) -> SegMetrics:
    """Score ``G`` on ``dataset`` (items (image, label, name)), label pixels of ``cfg.ignore_index`` not counted;
    all-reduces over ranks when distributed."""
    info = info or dist_utils.DistInfo(device=torch.device(device))
    cfg = cfg or TrainConfig()
    ignore_index = cfg.ignore_index
    was_training = G.training
    G.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    indices = range(info.rank, len(dataset), info.world_size)
    for group in _batches(dataset, indices, batch_size):
        images = to_device(torch.stack([g[0] for g in group]), device, cfg.channels_last)
        labels = torch.stack([g[1] for g in group]).to(device)
        with autocast(cfg, device):
            pred = segment(G, images, tuple(labels.shape[-2:])).argmax(1)
        for p, t in zip(pred, labels):
            if cfg.val_pad:  # crop the prediction back to the original image before scoring
                h, w = _valid_extent(t, ignore_index)
                p, t = p[:h, :w], t[:h, :w]
            cm.update(p, t)
    cm.all_reduce()
    G.train(was_training)
    return cm.compute()


@torch.no_grad()
def confidence_maps(G, D, images: torch.Tensor, size, cfg: TrainConfig):
    """Predictions and sigmoid(D(softmax(logits))): where the discriminator trusts the prediction."""
    was_training = G.training
    G.eval()
    with autocast(cfg, images.device):
        logits = segment(G, images, size)
        d = D(d_input(cfg, fas.softmax2d(logits, backend=cfg.loss_backend), images))
        conf = torch.sigmoid(at_size(d, size).float())[:, 0]  # D may return its own low-resolution map
    G.train(was_training)
    return logits.argmax(1), conf


def write_report(result: SegMetrics, class_names, out_dir: str, stem: str = "eval", extra=None) -> str:
    """``<stem>.md`` (the per-class table) and ``<stem>.json``; returns the table."""
    table = format_table(class_names, result)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, stem + ".json"), "w", encoding="utf-8") as f:
        json.dump({**(extra or {}), **result.to_dict(class_names)}, f, indent=2)
    return table


def usable_checkpoint(run_dir: str, which: str = "best", log=print):
    """(path, state) of the run's best.pt (``which="last"``: last.pt first), falling back to the other one when the
    first is missing or damaged (said on ``log``). No usable checkpoint: a ConfigError saying why."""
    order = (BEST, LAST) if which == "best" else (LAST, BEST)
    problems = []
    for name in order:
        path = os.path.join(run_dir, "checkpoints", name)
        if not os.path.isfile(path):
            continue
        try:
            state = read_checkpoint(path)
            if not isinstance(state, dict) or not isinstance(state.get("G"), dict):
                raise CheckpointError(f"checkpoint {path} holds no segmenter weights ('G')")
            bad = first_non_finite(state["G"])
            if bad:
                raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad})")
        except CheckpointError as e:
            problems.append(str(e))
            log(f"warning: {e}; trying the other checkpoint")
            continue
        return path, state
    if not problems:
        raise ConfigError(f"run directory {run_dir} has no checkpoints (checkpoints/{BEST}, checkpoints/{LAST}): "
                          f"it has not saved any yet; train it (or continue it with --resume {run_dir}) first")
    raise ConfigError(f"run directory {run_dir} has no usable checkpoint: " + "; ".join(problems))


def _describe(path: str, state) -> str:
    step, miou = (state.get("step"), state.get("val_miou")) if isinstance(state, dict) else (None, None)
    return (f"checkpoint {path}" + (f" (step {step}" if step is not None else "") +
            (f", val mIoU {100 * miou:.2f} when saved" if isinstance(miou, float) else "") +
            (")" if step is not None else ""))


def main(argv: Optional[Sequence[str]] = None, *, own_process: bool = False) -> int:
    """Exit codes: 0 done; 2 refused (one line ``error: ...``: a bad option, config, checkpoint or data file).

    ``own_process`` (``python -m fastadvseg.evaluate``): first set the process's memory allocator as the config's
    ``allocator`` says (fastadvseg/utils/allocator.py); the first line printed names the allocator in effect."""
    parser = build_parser("Evaluate a trained segmenter (mIoU, per-class IoU, pixel accuracy).",
                          prog="python -m fastadvseg.evaluate")
    parser.add_argument("--run", help="a run directory: uses its config.yaml and checkpoints/best.pt (else last.pt)")
    parser.add_argument("--checkpoint", help="a checkpoint or a segmenter state_dict")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="with --run: which checkpoint")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="the images scored: val (default) or the held-out test split (synthetic data; report it, "
                             "choose nothing on it); the report is eval.md / eval_test.md")
    parser.add_argument("--out", help="directory for eval.md / eval.json (default: the run directory)")
    args, rest = parser.parse_known_args(argv)
    warn = lambda msg: print(msg, file=sys.stderr)
    try:
        require_pipeline_extras("python -m fastadvseg.evaluate")
        overrides = parse_overrides(rest)
        if args.run:
            config_yaml = os.path.join(args.run, "config.yaml")
            if not os.path.isfile(config_yaml):
                raise ConfigError(f"{args.run} is not a run directory (no config.yaml in it)")
            cfg = load_config(args.config, overrides, base=from_dict(read_config_file(config_yaml), validate=False))
            ckpt, state = usable_checkpoint(args.run, args.which, warn)
            split = os.path.join(args.run, "split.json")
            if os.path.isfile(split) and "split_file" not in overrides:
                cfg.split_file = split
        elif args.checkpoint:
            cfg, ckpt = load_config(args.config, overrides), args.checkpoint
            state = read_checkpoint(ckpt)
            if not isinstance(state, dict) or not isinstance(state.get("G"), dict):
                state = None  # a bare state_dict (any known layout): read by the model's weight loader
        else:
            parser.error("give --run DIR or --checkpoint PATH")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    alloc = allocator.configure(cfg.allocator, reexec=True) if own_process else allocator.in_effect()
    info = dist_utils.setup(cfg.device)
    if info.is_main:
        print(alloc.log_line(), flush=True)
    code = 0
    try:
        with dist_utils.cpu_threads(cfg.num_threads if info.device.type == "cpu" else None):
            bundle = build_bundle(cfg)
            check_data(bundle, print if info.is_main else (lambda *a: None), train=False)
            images = bundle.val if args.split == "val" else bundle.test
            if images is None:
                raise ConfigError(f"--split test: dataset {cfg.dataset} has no held-out test split here (the "
                                  f"embedded synthetic data has one)")
            G = build_segmenter_for_eval(cfg, bundle, state if state is not None else ckpt, info.device, ckpt)
            if info.is_main:
                print(f"evaluating {_describe(ckpt, state)}")
            result = evaluate(G, images, bundle.num_classes, device=info.device,
                              batch_size=cfg.eval_batch_size, cfg=cfg, info=info)
        if info.is_main:
            out = args.out or args.run or os.path.dirname(os.path.abspath(ckpt))
            stem = "eval" if args.split == "val" else "eval_test"
            table = write_report(result, bundle.class_names, out, stem, extra={"checkpoint": ckpt, "split": args.split})
            print(table)
            print(f"{args.split} mIoU {100 * result.miou:.2f}  pixel accuracy {100 * result.pixel_acc:.2f}  "
                  f"({len(images)} {args.split} images; {_describe(ckpt, state)}; report in {out}/{stem}.md, "
                  f"{stem}.json)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        dist_utils.teardown(info)
    return dist_utils.finish(info, code)


if __name__ == "__main__":
    sys.exit(main(own_process=True))
