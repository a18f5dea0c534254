"""Pretrain the compact segmenter's backbone on a disjoint synthetic task: ``python -m fastadvseg.pretrain``.

The paper never trains from scratch: every result starts from ImageNet / MS-COCO weights. This is that start for the
embedded data, made the same way: the compact DeepLab-v2 (``deeplabv2_compact``) learns plain cross-entropy
segmentation of another task (fastadvseg/data/pretrain_shapes.py: other classes, shapes and textures, its own random
streams: no image or class of the target data), and only its **backbone** is kept; the classifier head (of the
pretraining classes) is dropped, so the target run starts with a fresh head, as with ImageNet weights.

    python -m fastadvseg.pretrain --out runs/pretrain/compact_synthetic.pt     # the shipped file's command
    python -m fastadvseg.train --init pretrained                                # starts from the shipped backbone

Every item is fresh (item ``step * batch_size + i`` of the pretraining stream: no epoch, no over-fitting), the
initialisation and the items follow ``--seed``, and with ``--threads 1`` a run is bit-identical on the same CPU and
torch build (the file written is too: it is saved without a timestamp). It writes the backbone's state_dict
(``backbone.*`` keys: fastadvseg's layout, read by ``--pretrained FILE`` and ``--init pretrained``) and, beside it,
``<out>.json``: the command, the settings, the timings, the loss curve, the mIoU on 128 held-out pretraining items
and the file's SHA-256.

The shipped ``fastadvseg/models/pretrained/compact_synthetic.pt`` (529,547 bytes) was made by the defaults:
``python -m fastadvseg.pretrain --out runs/pretrain/compact_synthetic.pt`` (8000 steps of 16 items of 64x64, seed 0,
1 thread), its SHA-256 recorded in ``fastadvseg.models.weights.SHIPPED`` and, with the loss curve, in the JSON beside
it. It took 11.1 minutes (664 s wall) on one thread of a 2-core x86_64 CPU shared with other test and
training jobs (about 6 minutes when the machine is otherwise idle: 0.047 s per step measured at the start); mean
cross-entropy 1.13 over the first 200 steps, 0.61 over the last 200; mIoU 25.1% on 128 held-out pretraining items.
Tiny settings (``--steps 3 --batch_size 2``) take a second or two.
"""
from __future__ import annotations

import io
import json
import os
import platform
import shlex
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import _Parser
from .data.pretrain_shapes import PRETRAIN_CLASSES, generate_pretrain
from .data.synthetic import MEAN, STD
from .models.deeplab import build_deeplab
from .models.weights import sha256_file

MODEL = "deeplabv2_compact"
HELD_OUT = 1 << 30  # held-out items are numbered from here: never a training item
IGNORE = 255


def batch(indices: Sequence[int], seed: int, size: int):
    """(images (B, 3, size, size), labels (B, size, size) int64). Images are normalised with the constants the target
    runs normalise with (synthetic.MEAN / STD), as ImageNet backbones are used with ImageNet's."""
    items = [generate_pretrain(i, seed, size) for i in indices]
    mean = np.asarray(MEAN, np.float32)
    std = np.asarray(STD, np.float32)
    x = torch.from_numpy(np.stack([(im - mean) / std for im, _ in items])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack([lab for _, lab in items]).astype(np.int64))
    return x, y


def logits_at(G, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(G(x), size=x.shape[-2:], mode="bilinear", align_corners=True)


@torch.no_grad()
def held_out_miou(G, seed: int, size: int, n: int = 128, batch_size: int = 16) -> float:
    """mIoU (%) of G on ``n`` held-out pretraining items (classes present in them)."""
    from .metrics import ConfusionMatrix

    was = G.training
    G.eval()
    cm = ConfusionMatrix(len(PRETRAIN_CLASSES), ignore_index=IGNORE)
    for start in range(0, n, batch_size):
        x, y = batch(range(HELD_OUT + start, HELD_OUT + min(n, start + batch_size)), seed, size)
        for p, t in zip(logits_at(G, x).argmax(1), y):
            cm.update(p, t)
    G.train(was)
    return 100 * cm.compute().miou


def save_backbone(G, path: str) -> str:
    """Write G's backbone state_dict (``backbone.*``) reproducibly (same bytes for the same weights); its SHA-256."""
    state = {k: v.detach().clone().contiguous() for k, v in G.state_dict().items() if k.startswith("backbone.")}
    buf = io.BytesIO()
    torch.save(state, buf)  # into memory: the archive's record names do not depend on the file name
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return sha256_file(path)


def pretrain(steps: int = 8000, batch_size: int = 16, size: int = 64, seed: int = 0, lr: float = 0.02,
             threads: Optional[int] = 1, log_every: int = 200, log=print) -> dict:
    """Train the compact segmenter on the pretraining task; returns {"G", "curve", "wall_s", "cpu_s", ...}."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    G = build_deeplab(MODEL, len(PRETRAIN_CLASSES), batchnorm="live")
    opt = torch.optim.SGD(G.param_groups(lr, 1.0), lr=lr, momentum=0.9, weight_decay=5e-4)
    t0, c0 = time.perf_counter(), time.process_time()
    curve: List[dict] = []
    window = []
    G.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps) ** 0.9
        x, y = batch(range(step * batch_size, (step + 1) * batch_size), seed, size)
        loss = F.cross_entropy(logits_at(G, x), y, ignore_index=IGNORE)
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: the loss is {float(loss)}: lower --lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": sum(window) / len(window)})
            window = []
            log(f"step {step + 1}/{steps}: loss {curve[-1]['loss']:.4f}  ({time.perf_counter() - t0:.0f} s)")
    return {"G": G, "curve": curve, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _Parser(prog="python -m fastadvseg.pretrain", description=__doc__.split("\n\n")[0],
                formatter_class=__import__("argparse").RawDescriptionHelpFormatter, allow_abbrev=False,
                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/pretrain/compact_synthetic.pt", help="the backbone file to write")
    p.add_argument("--steps", type=int, default=8000, help="training steps (default 8000)")
    p.add_argument("--batch_size", type=int, default=16, help="items per step (default 16)")
    p.add_argument("--size", type=int, default=64, help="item size in pixels (default 64, the training crop)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and items (default 0)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate, poly decay (default 0.02)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: bit-identical reruns)")
    p.add_argument("--log_every", type=int, default=200, help="print the mean loss every N steps")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.size < 33 or a.log_every < 1 or not a.lr > 0 or a.threads < 0:
        print("error: need --steps, --batch_size, --log_every >= 1, --size >= 33, --lr > 0, --threads >= 0",
              file=sys.stderr)
        return 2
    try:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "wb"):
            pass
        os.unlink(a.out + ".tmp")
    except OSError as e:
        print(f"error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"pretraining {MODEL} on {len(PRETRAIN_CLASSES)} classes ({', '.join(PRETRAIN_CLASSES[1:])}): {a.steps} "
          f"steps of {a.batch_size} items of {a.size}x{a.size}, seed {a.seed}, {a.threads or 'default'} thread(s)")
    res = pretrain(a.steps, a.batch_size, a.size, a.seed, a.lr, a.threads, a.log_every)
    miou = held_out_miou(res["G"], a.seed, a.size)
    digest = save_backbone(res["G"], a.out)
    record = {"command": shlex.join(["python", "-m", "fastadvseg.pretrain", *argv]), "model": MODEL,
              "classes": PRETRAIN_CLASSES, "steps": a.steps, "batch_size": a.batch_size, "size": a.size,
              "seed": a.seed, "lr": a.lr, "threads": a.threads, "held_out_miou": miou,
              "wall_s": round(res["wall_s"], 1), "cpu_s": round(res["cpu_s"], 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}",
              "bytes": os.path.getsize(a.out), "sha256": digest, "curve": res["curve"]}
    with open(a.out + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"held-out mIoU {miou:.1f} on 128 pretraining items; wrote {a.out} ({record['bytes']} bytes, sha256 {digest}) "
          f"and {a.out}.json in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
