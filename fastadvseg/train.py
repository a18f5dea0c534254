"""Train the paper's method: ``python -m fastadvseg.train [--config NAME|FILE] [--key value ...] [--resume RUN]``.

With no arguments: the compact DeepLab-v2 on the embedded synthetic data, semi mode, a few minutes on a CPU; it ends
with the per-class IoU table. ``--config voc_1_8`` etc. restore the paper's recipe. Multi-GPU / multi-node:
``torchrun --nproc_per_node=N -m fastadvseg.train ...`` (DistributedDataParallel; batch_size is the global batch).

A run directory ``runs/<name>/`` holds config.yaml, split.json, metrics.jsonl, checkpoints/{last,best}.pt, PNG
plots and eval.{md,json}. SIGINT/SIGTERM finish the current step, save, and exit; ``--resume runs/<name>``
continues to the same result as an uninterrupted run (bit-identical on CPU). Helpers live in fastadvseg/utils/.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional, Sequence

import torch

from .config import ConfigError, TrainConfig, build_parser, from_dict, load_config, parse_overrides, save_config
from .evaluate import evaluate
from .utils import distributed as dist_utils
from .utils.builders import build_bundle, build_models, build_optimizers, make_scaler, set_lr, to_device
from .utils.checkpoint import (BEST, LAST, atomic_save, load_checkpoint, resolve_checkpoint, restore_training_state,
                               run_dir_of, training_state)
from .utils.log import MetricsLog, Progress
from .utils.report import describe_run, final_report, make_run_dir
from .utils.sampling import StepBatches, step_loader
from .utils.step import Nets, train_step


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits. A second SIGINT aborts."""

    def __init__(self):
        self.signal = None
        if hasattr(signal, "SIGTERM") and _main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", flush=True)

    def restore(self):
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, resume: Optional[str] = None, info: Optional[dist_utils.DistInfo] = None) -> dict:
    """Train (or continue) a run; returns {"run_dir", "miou", "step", "interrupted", ...}."""
    info = info or dist_utils.setup(cfg.device)
    with dist_utils.cpu_threads(cfg.num_threads if info.device.type == "cpu" else None):
        return _train(cfg, resume, info)


def _train(cfg: TrainConfig, resume: Optional[str], info: dist_utils.DistInfo) -> dict:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    state = load_checkpoint(resolve_checkpoint(resume)) if resume else None
    try:  # before the run directory: a bad data setting leaves nothing behind
        bundle = build_bundle(cfg)
    except (ValueError, FileNotFoundError) as e:
        hint = " (set --data_root)" if "root" in str(e) and not cfg.data_root else ""
        raise ConfigError(f"{e}{hint}") from e
    run_dir = make_run_dir(cfg, info, run_dir_of(resolve_checkpoint(resume)) if resume else None)
    log = print if info.is_main else (lambda *a, **k: None)
    G, D = build_models(cfg, bundle, info.device, log)
    opt_g, opt_d = build_optimizers(cfg, G, D)
    scaler_g, scaler_d = make_scaler(cfg, info.device), make_scaler(cfg, info.device)
    start, best = restore_training_state(state, G, D, opt_g, opt_d, {"g": scaler_g, "d": scaler_d})
    log(describe_run(cfg, bundle, G, info, run_dir))
    if state is not None:
        log(f"resumed {run_dir} at step {start} (best mIoU so far {best})")
    if info.is_main:  # on resume: the config with this session's overrides (e.g. more steps); the split is kept
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        if state is None:
            from .data import save_split

            save_split(bundle.split, os.path.join(run_dir, "split.json"), dataset=cfg.dataset, seed=cfg.split_seed)
    nets = Nets(*_wrap(G, D, cfg, info), D_raw=D, opt_g=opt_g, opt_d=opt_d, scaler_g=scaler_g, scaler_d=scaler_d)
    use_unl = cfg.mode == "semi" and bundle.unlabelled is not None and len(bundle.unlabelled) > 0
    loaders = [step_loader(StepBatches(ds, cfg.batch_size, cfg.seed, stream, info.rank, info.world_size),
                           start, cfg.steps, cfg.num_workers, info.device.type == "cuda")
               for stream, ds in (("labelled", bundle.labelled), ("unlabelled", bundle.unlabelled if use_unl else None))
               if ds is not None]
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if info.is_main else None, resume_step=start)
    progress, stop = Progress(cfg.steps, start, enabled=info.is_main), StopFlag()
    save = lambda step, path: atomic_save(training_state(step, G, D, opt_g, opt_d, {"g": scaler_g, "d": scaler_d},
                                                         best, cfg.to_dict()), path)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    G.train(), D.train()
    result, stopping = None, False
    for step, batches in zip(range(start, cfg.steps), zip(*loaders)):
        lr = set_lr(opt_g, cfg.lr, step, cfg.steps, cfg.power)
        lr_d = set_lr(opt_d, cfg.lr_d, step, cfg.steps, cfg.power)
        (images, labels, _), images_u = batches[0], (batches[1][0] if use_unl else None)
        out = train_step(cfg, nets, step, to_device(images, info.device, cfg.channels_last), labels.to(info.device),
                         None if images_u is None else to_device(images_u, info.device, cfg.channels_last))
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last or step == 0:
            values = {"kind": "train", "step": step + 1, "lr": lr, "lr_d": lr_d, **{k: float(v) for k, v in out.items()}}
            metrics.write(values), progress.print(step, values)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            result = evaluate(G, bundle.val, bundle.num_classes, device=info.device, batch_size=cfg.eval_batch_size,
                              cfg=cfg, info=info)
            metrics.write({"kind": "val", "step": step + 1, "miou": result.miou, "pixel_acc": result.pixel_acc})
            log(f"step {step + 1}: val mIoU {100 * result.miou:.2f}  pixel acc {100 * result.pixel_acc:.2f}")
            if best is None or result.miou > best:
                best = result.miou
                if info.is_main:
                    save(step + 1, os.path.join(ckpt_dir, BEST))
        stopping = dist_utils.any_true(stop.signal is not None, info)
        if info.is_main and (last or stopping or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            save(step + 1, os.path.join(ckpt_dir, LAST))
        if stopping:
            log(f"stopped after step {step + 1}; continue with: python -m fastadvseg.train --resume {run_dir}")
            break
    stop.restore(), metrics.close()
    if stopping:
        return {"run_dir": run_dir, "step": step + 1, "interrupted": True, "miou": None, "best_miou": best}
    if result is None:  # resumed a finished run: just report
        result = evaluate(G, bundle.val, bundle.num_classes, device=info.device, batch_size=cfg.eval_batch_size,
                          cfg=cfg, info=info)
    return final_report(cfg, bundle, G, D, run_dir, info, result, best, time.perf_counter() - t_start,
                        time.process_time() - cpu_start)


def _wrap(G, D, cfg: TrainConfig, info: dist_utils.DistInfo):
    if not info.enabled:
        return G, D
    from torch.nn.parallel import DistributedDataParallel as DDP

    if info.device.type == "cuda" and not cfg.freeze_bn:
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    ids = [info.device.index] if info.device.type == "cuda" else None
    kw = {}
    if cfg.freeze_bn:  # frozen BN statistics never change: no need to re-broadcast them every forward
        import inspect

        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        kw[sync] = False
    return DDP(G, device_ids=ids, **kw), DDP(D, device_ids=ids)


def parse_cli(argv: Optional[Sequence[str]] = None):
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--resume", help="a run directory or checkpoint to continue (its config, then overrides)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.resume:
        base = from_dict(load_checkpoint(resolve_checkpoint(args.resume))["config"])
        cfg = load_config(args.config, overrides, base=base)
        split = os.path.join(run_dir_of(resolve_checkpoint(args.resume)), "split.json")
        if os.path.isfile(split):
            cfg.split_file = split
        return cfg, args.resume
    return load_config(args.config, overrides), None


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg, resume = parse_cli(argv)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = dist_utils.setup(cfg.device)
    try:
        train(cfg, resume, info)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:  # bad data, weights paths, run names
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.teardown(info)
    return dist_utils.finish(info)


if __name__ == "__main__":
    sys.exit(main())
