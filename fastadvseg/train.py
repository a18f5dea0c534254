"""Train the paper's method: ``python -m fastadvseg.train [--config NAME|FILE] [--key value ...] [--resume RUN]``.

With no arguments: the compact DeepLab-v2 on the embedded synthetic data, semi mode, a few minutes on a CPU; it ends
with the per-class IoU table. ``--config voc_1_8`` etc. restore the paper's recipe. Multi-GPU / multi-node:
``torchrun --nproc_per_node=N -m fastadvseg.train ...`` (DistributedDataParallel; batch_size is the global batch).

A run directory ``runs/<name>/`` holds config.yaml, split.json, metrics.jsonl, checkpoints/{last,best}.pt, PNG
plots and eval.{md,json}. SIGINT/SIGTERM finish the current step, save, and exit; ``--resume runs/<name>``
continues to the same result as an uninterrupted run (bit-identical on CPU). Helpers live in fastadvseg/utils/.

What is checked, in order, before the run directory is created or changed (a refused run is one line ``error: ...``,
exit code 2): the config (types, ranges, finite numbers), the checkpoint to resume (readable, a complete finite
training state, resume overrides that keep its meaning), the data (every file readable, masks of their image's size,
values in [0, C) or 255), the checkpoint against the data's classes and the networks, the run directory (not another
run's, not in use: a lock). During the run the first non-finite loss or gradient norm stops it (exit code 3) and
nothing non-finite is ever saved; best.pt is only ever replaced by a better model. See ``main`` for the exit codes.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .config import (UNLABELLED_MODES, ConfigError, TrainConfig, build_parser, load_config,
                     parse_overrides, read_config_file, require_pipeline_extras, save_config, saved_config)
from .evaluate import evaluate
from .utils import allocator
from .utils import distributed as dist_utils
from .utils.builders import (build_bundle, build_models, build_optimizers, build_teacher, check_data, make_scaler,
                             set_lr, to_device)
from .utils.checkpoint import (BEST, LAST, CheckpointError, atomic_save, check_data_fits, check_resume,
                               config_differences, first_non_finite, read_training_state, recorded_miou,
                               remove_stale_temp_files, resolve_checkpoint, restore_training_state, run_dir_of,
                               training_state, unwrap)
from .utils.log import MetricsLog, Progress, TensorBoardLog, WindowMean
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


@dataclass
class Resume:
    """A checkpoint to continue: its path and its checked training state (read once)."""
    path: str
    state: dict

    @property
    def run_dir(self) -> str:
        return run_dir_of(self.path)


def open_resume(path: str) -> Resume:
    """``--resume RUN|FILE``: the checkpoint found, read and checked (CheckpointError naming it otherwise)."""
    ckpt = resolve_checkpoint(path)
    try:
        return Resume(ckpt, read_training_state(ckpt))
    except CheckpointError as e:
        best = os.path.join(os.path.dirname(ckpt), BEST)
        if os.path.basename(ckpt) == LAST and os.path.isfile(best):
            raise CheckpointError(f"{e} (its best.pt may be usable: --resume {best})") from None
        raise


class RunStopped(RuntimeError):
    """The run stopped before its last step (non-finite values, a checkpoint that cannot be written); the
    checkpoints on disk are those of before the problem. Exit code 3."""


def train(cfg: TrainConfig, resume=None, info: Optional[dist_utils.DistInfo] = None) -> dict:
    """Train (or continue: ``resume`` is a run directory, a checkpoint or a :class:`Resume`) a run; returns
    {"run_dir", "miou", "step", "interrupted", "signal", ...}. User errors raise ConfigError before anything is
    written; a run stopped midway raises RunStopped."""
    info = info or dist_utils.setup(cfg.device)
    with dist_utils.cpu_threads(cfg.num_threads if info.device.type == "cpu" else None):
        return _train(cfg, open_resume(resume) if isinstance(resume, str) else resume, info)


def _train(cfg: TrainConfig, resume: Optional[Resume], info: dist_utils.DistInfo) -> dict:
    """The run, top to bottom: check and build everything, then the training loop of the paper's method (one G + D
    iteration per step: fastadvseg/utils/step.py) with logging, evaluation, checkpoints and the stop on non-finite
    values, then the final report."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    log = print if info.is_main else (lambda *a, **k: None)
    state = resume.state if resume else None
    cfg.allocator = allocator.in_effect().name  # config.yaml records what this process allocates with
    # ---- everything is checked before the run directory is created or changed: a refused run leaves no trace ----
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"config batch_size={cfg.batch_size}: the global batch must split evenly over the "
                          f"{info.world_size} processes")
    if cfg.mode == "mean_teacher" and cfg.batch_size // info.world_size < 2:
        raise ConfigError(f"config batch_size={cfg.batch_size}: mode mean_teacher blends pairs of unlabelled crops, so "
                          f"each of the {info.world_size} processes needs at least 2 per batch")
    changed = check_resume(cfg.to_dict(), state, resume.path) if resume else {}  # {key: (old, new)} allowed
    if resume:
        check_same_run(resume)
    bundle = build_bundle(cfg)
    check_data(bundle, log)
    if cfg.eval_test and bundle.test is None:
        raise ConfigError(f"config eval_test=True: dataset {cfg.dataset} has no held-out test split here (the embedded "
                          f"synthetic data has one)")
    if resume:
        check_data_fits(state, bundle.class_names, resume.path)
    G, D = build_models(cfg, bundle, info.device, log, pretrained=state is None)
    opt_g, opt_d = build_optimizers(cfg, G, D)
    teacher = build_teacher(cfg, G)  # before any wrapping: the EMA of the bare student
    scaler_g, scaler_d = make_scaler(cfg, info.device), make_scaler(cfg, info.device)
    start, best = restore_training_state(state, G, D, opt_g, opt_d, {"g": scaler_g, "d": scaler_d},
                                         resume.path if resume else "", teacher=teacher)

    # ---- the run: one process per run directory (its lock); files are written from here on ----
    run_dir, lock = make_run_dir(cfg, info, resume.run_dir if resume else None)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    with lock, contextlib.ExitStack() as cleanup:  # on leaving: logs closed, signal handlers restored, lock released
        if resume:
            best = _best_so_far(best, os.path.join(ckpt_dir, BEST))
        log(describe_run(cfg, bundle, G, info, run_dir))
        if info.is_main:
            _open_run_dir(cfg, bundle, run_dir, new_run=resume is None, finished=start >= cfg.steps, log=log)
        metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if info.is_main else None, resume_step=start)
        tb = TensorBoardLog(run_dir if info.is_main and cfg.tensorboard else None)
        cleanup.callback(metrics.close), cleanup.callback(tb.close)
        if resume:
            log(f"resumed {run_dir} at step {start} (best mIoU so far {best})" +
                "".join(f"; {k} {old} -> {new}" for k, (old, new) in changed.items()))
            if changed:  # recorded: config.yaml has the new values, metrics.jsonl when they changed
                metrics.write({"kind": "resume", "step": start, "changed": {k: list(v) for k, v in changed.items()}})
        nets = Nets(*_wrap(G, D, cfg, info), D_raw=D, opt_g=opt_g, opt_d=opt_d, scaler_g=scaler_g, scaler_d=scaler_d,
                    teacher=teacher)
        use_unl = cfg.mode in UNLABELLED_MODES and bundle.unlabelled is not None and len(bundle.unlabelled) > 0
        loaders = [step_loader(StepBatches(ds, cfg.batch_size, cfg.seed, stream, info.rank, info.world_size),
                               start, cfg.steps, cfg.num_workers, info.device.type == "cuda")
                   for stream, ds in (("labelled", bundle.labelled),
                                      ("unlabelled", bundle.unlabelled if use_unl else None))
                   if ds is not None]
        progress, stop, window = Progress(cfg.steps, start, enabled=info.is_main), StopFlag(), WindowMean()
        cleanup.callback(stop.restore)

        def save(step: int, name: str, val_miou: Optional[float] = None) -> None:
            """Checkpoint after ``step`` steps, never with non-finite weights; an OSError stops the run, naming it."""
            bad = first_non_finite({"G": unwrap(G).state_dict(), "D": unwrap(D).state_dict(),
                                    **({"teacher": teacher.state_dict()} if teacher is not None else {})})
            if bad:
                raise RunStopped(f"step {step}: weight {bad} is not finite, so it was not saved (the checkpoints on "
                                 f"disk are of earlier steps): training diverged. Lower --lr and start a new run")
            path = os.path.join(ckpt_dir, name)
            checkpoint = training_state(step, G, D, opt_g, opt_d, {"g": scaler_g, "d": scaler_d}, best,
                                        cfg.to_dict(), extra={"classes": list(bundle.class_names),
                                                              "val_miou": val_miou}, teacher=teacher)
            try:
                atomic_save(checkpoint, path)
            except OSError as e:
                raise RunStopped(f"cannot write checkpoint {path}: {e.strerror or e} (the previous {name} is "
                                 f"unchanged and usable): free some space, then continue with --resume {run_dir}"
                                 ) from None

        G.train(), D.train()
        result, stopping, step = None, False, start - 1
        for step, batches in zip(range(start, cfg.steps), zip(*loaders)):
            lr = set_lr(opt_g, cfg.lr, step, cfg.steps, cfg.power)
            lr_d = set_lr(opt_d, cfg.lr_d, step, cfg.steps, cfg.power)
            (images, labels, _), images_u = batches[0], (batches[1][0] if use_unl else None)
            out = train_step(cfg, nets, step, to_device(images, info.device, cfg.channels_last),
                             labels.to(info.device),
                             None if images_u is None else to_device(images_u, info.device, cfg.channels_last),
                             num_classes=bundle.num_classes)
            values = dict(zip(out, torch.stack(list(out.values())).float().tolist()))  # one device sync per step
            bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
            if bad:  # the first non-finite loss or gradient norm stops the run; nothing of this step is saved
                metrics.write({"kind": "train", "step": step + 1, "lr": lr, "lr_d": lr_d, **values, "window": 1})
                metrics.write({"kind": "stopped", "step": step + 1, "reason": f"{bad} is {values[bad]}"})
                raise RunStopped(f"step {step + 1}: {bad} is {values[bad]}: training diverged and was stopped. The "
                                 f"checkpoints are those of before (last.pt, best.pt unchanged). Lower --lr "
                                 f"(now {cfg.lr}) or --lr_d (now {cfg.lr_d}) and start a new run")
            window.add(values)
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.log_every == 0 or last or step == 0:
                record = {"kind": "train", "step": step + 1, "lr": lr, "lr_d": lr_d, **window.pop()}
                metrics.write(record), tb.write(record), progress.print(step, record)
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                result = evaluate(G, bundle.val, bundle.num_classes, device=info.device,
                                  batch_size=cfg.eval_batch_size, cfg=cfg, info=info)
                record = {"kind": "val", "step": step + 1, "miou": result.miou, "pixel_acc": result.pixel_acc}
                metrics.write(record), tb.write(record)
                log(f"step {step + 1}: val mIoU {100 * result.miou:.2f}  pixel acc {100 * result.pixel_acc:.2f}")
                if math.isfinite(result.miou) and (best is None or result.miou > best):  # never a worse model
                    best = result.miou
                    if info.is_main:
                        save(step + 1, BEST, val_miou=result.miou)
            stopping = dist_utils.any_true(stop.signal is not None, info)
            checkpoint_due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if info.is_main and (last or stopping or checkpoint_due):
                save(step + 1, LAST)
            if stopping:
                log(f"stopped after step {step + 1}; continue with: python -m fastadvseg.train --resume {run_dir}")
                return {"run_dir": run_dir, "step": step + 1, "interrupted": True,
                        "signal": stop.signal or signal.SIGTERM, "miou": None, "best_miou": best}
        if result is None:  # resumed a finished run: just report
            result = evaluate(G, bundle.val, bundle.num_classes, device=info.device, batch_size=cfg.eval_batch_size,
                              cfg=cfg, info=info)
        test = evaluate(G, bundle.test, bundle.num_classes, device=info.device, batch_size=cfg.eval_batch_size,
                        cfg=cfg, info=info) if cfg.eval_test else None  # the final model, as on val; nothing chosen
        return final_report(cfg, bundle, G, D, run_dir, info, result, best, time.perf_counter() - t_start,
                            time.process_time() - cpu_start, step=max(step + 1, start), test=test, teacher=teacher)


def _open_run_dir(cfg: TrainConfig, bundle, run_dir: str, *, new_run: bool, finished: bool, log) -> None:
    """Rank 0, before the first step: clear the temp files of killed writes, write config.yaml (on resume: with this
    session's overrides, e.g. more steps), drop summary.json of a finished run given more steps, and write the
    split of a new run (a resumed run keeps its own)."""
    for path in remove_stale_temp_files(run_dir):
        log(f"removed {path} (left by a write that was killed)")
    write_config(cfg, os.path.join(run_dir, "config.yaml"))
    summary = os.path.join(run_dir, "summary.json")
    if not finished and os.path.isfile(summary):  # a finished run given more steps: not finished any more
        os.unlink(summary)
    if new_run:
        from .data import save_split

        save_split(bundle.split, os.path.join(run_dir, "split.json"), dataset=cfg.dataset, seed=cfg.split_seed)


def check_same_run(resume: Resume) -> None:
    """The checkpoint belongs to its run directory: its settings are those of the run's config.yaml (except
    RESUMABLE ones). Catches a checkpoint copied in from a run with other settings."""
    run_dir = resume.run_dir
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    differ = config_differences(resume.state["config"], read_config_file(path))
    if differ:
        what = ", ".join(f"{k} {a!r} (config.yaml: {b!r})" for k, (a, b) in differ.items())
        raise CheckpointError(f"checkpoint {resume.path} is not of the run in {run_dir}: it was trained with {what}. "
                              f"Put back the run's own checkpoint, or resume that checkpoint's run instead")


def _best_so_far(best: Optional[float], best_path: str) -> Optional[float]:
    """The best mIoU to beat: the checkpoint's, or that of the best.pt on disk if higher (best.pt is never replaced
    by a worse model, even if the checkpoint resumed from is older than best.pt)."""
    on_disk = recorded_miou(best_path) if os.path.isfile(best_path) else None
    return max((b for b in (best, on_disk) if b is not None), default=None)


def write_config(cfg: TrainConfig, path: str) -> None:
    """config.yaml, replaced atomically (a kill never leaves half of it)."""
    tmp = path + ".tmp"
    save_config(cfg, tmp)
    os.replace(tmp, path)


def _wrap(G, D, cfg: TrainConfig, info: dist_utils.DistInfo):
    if not info.enabled:
        return G, D
    from torch.nn.parallel import DistributedDataParallel as DDP

    if info.device.type == "cuda" and cfg.batchnorm != "frozen":  # batch statistics of the global batch
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    ids = [info.device.index] if info.device.type == "cuda" else None
    kw = {}
    if cfg.batchnorm == "frozen":  # frozen BN statistics never change: no need to re-broadcast them every forward
        import inspect

        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        kw[sync] = False
    return DDP(G, device_ids=ids, **kw), DDP(D, device_ids=ids)


def parse_cli(argv: Optional[Sequence[str]] = None):
    """(config, Resume or None) from the command line; ConfigError for anything wrong in it."""
    parser = build_parser(__doc__.split("\n\n")[0], prog="python -m fastadvseg.train")
    parser.add_argument("--resume", help="a run directory or checkpoint to continue (its config, then overrides)")
    args, rest = parser.parse_known_args(argv)
    require_pipeline_extras("python -m fastadvseg.train")
    overrides = parse_overrides(rest)
    if args.resume:
        resume = open_resume(args.resume)
        try:
            base = saved_config(resume.state["config"])  # validated with the overrides applied
        except ConfigError as e:  # e.g. written by a version with other settings
            raise CheckpointError(f"checkpoint {resume.path} holds a config this version cannot use: {e}") from None
        cfg = load_config(args.config, overrides, base=base)
        split = os.path.join(resume.run_dir, "split.json")
        if os.path.isfile(split):
            cfg.split_file = split
        return cfg, resume
    return load_config(args.config, overrides), None


def main(argv: Optional[Sequence[str]] = None, *, own_process: bool = False) -> int:
    """Exit codes: 0 done; 2 refused (a bad option, config, data file, checkpoint, or a busy run directory: one
    line ``error: ...``, nothing written); 3 stopped midway (non-finite values, a file that cannot be written:
    the checkpoints on disk are still usable); 130 / 143 interrupted by SIGINT / SIGTERM after saving (130 also
    for a second SIGINT, which stops without saving).

    ``own_process`` (``python -m fastadvseg.train``): first set the process's memory allocator as ``--allocator``
    says (fastadvseg/utils/allocator.py; ``jemalloc``/``tcmalloc`` restart the process). Called as a function the
    process is left as it is. Either way the first line printed names the allocator in effect."""
    try:
        cfg, resume = parse_cli(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    alloc = allocator.configure(cfg.allocator, reexec=True) if own_process else allocator.in_effect()
    info = dist_utils.setup(cfg.device)
    if info.is_main:
        print(alloc.log_line(), flush=True)
    code = 0
    try:
        out = train(cfg, resume, info)
        if out.get("interrupted"):
            code = 128 + int(out["signal"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    except OSError as e:  # writing the run's other files (metrics, config, plots, report): name the path
        print(f"error: cannot write {e.filename or 'a file of the run'}: {e.strerror or e}; the checkpoints are "
              f"unchanged: fix it, then continue with --resume", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without saving
        print("error: interrupted (a second Ctrl-C, or one before training started): stopped without saving; the "
              "last checkpoint is unchanged", file=sys.stderr)
        code = 130
    finally:
        dist_utils.teardown(info)
    return dist_utils.finish(info, code)


if __name__ == "__main__":
    sys.exit(main(own_process=True))
