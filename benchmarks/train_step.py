"""``--train-step``: the training step as ``python -m fastadvseg.train`` runs it, timed as a training loop runs it.

The per-op tables time one op called again and again. A training step differs: the model's activations are alive,
every step allocates the logits, D's maps and all gradients afresh and frees them again (``zero_grad(set_to_none=
True)``), so what the C library's allocator does with a freed 17 MB buffer (keep it, or hand it back to the OS and
fault it in again page by page on the next step) is part of the step's cost. Two steps are timed:

* ``pipeline``: :func:`fastadvseg.utils.step.train_step` itself, the pipeline's own code (not a copy): G on a
  labelled and an unlabelled batch (``generator_loss``, two backward passes, SGD step), then D on
  [fake labelled, fake unlabelled, real] (``discriminator_loss``, Adam step). G is the pipeline's default
  ``deeplabv2_compact``, D its ``FCDiscriminator`` (ndf 32), built by ``fastadvseg.utils.builders``; mode semi with
  L_semi on. The losses come from ``fastadvseg`` (backend auto), from :mod:`benchmarks.reference_ops` (``eager``)
  or from ``torch.compile`` of those (``compile``), passed to ``train_step(losses=...)``.
* ``losses``: the losses alone, as the issue measured them: a labelled plus an unlabelled ``generator_loss``,
  summed, one backward, the leaves' ``.grad`` set to None between steps.

Per step: wall time and minor page faults (``getrusage(RUSAGE_SELF).ru_minflt`` deltas, every thread of the
process). Impls are timed in blocks of consecutive steps, as a training loop runs them (the first step of a block,
after a switch of impl, is not recorded), the blocks rotating over rounds so that a change in machine load hits
every impl alike. Reported: p10 / median / p90 of the step time, images/s, faults per step (median and p90).

:func:`run_allocators` (``--allocators``) runs the fastadvseg and eager steps once per allocator setting
(fastadvseg/utils/allocator.py), each in a fresh process (``python -m benchmarks.train_step``), the processes
alternating over rounds: the measurement behind the allocator ``python -m fastadvseg.train`` picks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from . import reference_ops as R
from .cases import IGNORE, IGNORE_FRACTION, LAMBDA_ADV, LAMBDA_SEMI, LAMBDA_SEMI_ADV, THRESHOLD
from .shapes import CITYSCAPES, VOC, VOC_SMALL, Shape
from .timing import order_stats, summarize, sync

TINY = Shape("tiny", 1, 5, 33, 33, tiny=True)  # the smallest crop D takes (it downsamples by 32)
STEP_SHAPES = {"cpu": (VOC_SMALL, CITYSCAPES), "cuda": (VOC, CITYSCAPES), "tiny": (TINY,)}
IMPLS = ("fastadvseg", "eager", "compile")
STEPS = ("pipeline", "losses")
# (rounds, seconds of timed steps per impl): each block gets as many steps as that allows, 2 to 8 (the default
# pipeline step takes about 1 s at voc-n2 and 5 s at cityscapes on 2 idle CPU cores; the losses alone 5-150 ms)
SCHEDULE = {"cpu": (3, 20.0), "cuda": (3, 5.0), "tiny": (2, 0.0)}
BLOCK_RANGE = (2, 8)


# --- the loss functions the step calls ----------------------------------------------------------------------------

class _GenOut(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    adv: torch.Tensor
    semi: torch.Tensor
    semi_ratio: torch.Tensor


def _ref_generator_loss(logits, d_logits, target=None, *, lambda_adv, lambda_semi=0.1, threshold=0.2,
                        ignore_index=IGNORE, backend=None):
    """fastadvseg.generator_loss's result from the plain composition of benchmarks/reference_ops.py."""
    zero = logits.new_zeros((), dtype=torch.float32)
    if target is not None:
        ce = R.cross_entropy2d(logits, target, ignore_index)
        adv = R.bce_with_logits2d(d_logits, 1.0, target == ignore_index)
        return _GenOut(ce + lambda_adv * adv, ce, adv, zero, zero)
    adv = R.bce_with_logits2d(d_logits, 1.0)
    if not lambda_semi:
        return _GenOut(lambda_adv * adv, zero, adv, zero, zero)
    semi = R.semi_cross_entropy2d(logits, d_logits.detach(), threshold, ignore_index)
    with torch.no_grad():
        ratio = (torch.sigmoid(d_logits) > threshold).float().mean()
    return _GenOut(lambda_adv * adv + lambda_semi * semi, zero, adv, semi, ratio)


def _ref_discriminator_loss(d_fake, d_real, *, ignore_mask_fake=None, ignore_mask_real=None, backend=None):
    return R.bce_with_logits2d(d_fake, 0.0, ignore_mask_fake) + R.bce_with_logits2d(d_real, 1.0, ignore_mask_real)


def reference_losses(compiled: bool = False) -> types.SimpleNamespace:
    """What ``train_step(losses=...)`` calls, from benchmarks/reference_ops.py (the ``eager`` impl of the per-op
    tables), each function under ``torch.compile`` with ``compiled`` (the ``compile`` impl). ``backend=`` is
    accepted and ignored."""
    fns = {
        "softmax2d": lambda x, backend=None: R.softmax2d(x),
        "generator_loss": _ref_generator_loss,
        "cross_entropy2d": lambda x, y, ignore_index=IGNORE, backend=None: R.cross_entropy2d(x, y, ignore_index),
        "one_hot2d": lambda y, c, ignore_index=IGNORE, dtype=torch.float32, backend=None: R.one_hot2d(
            y, c, ignore_index, dtype),
        "discriminator_loss": _ref_discriminator_loss,
    }
    if compiled:
        fns = {k: torch.compile(f) for k, f in fns.items()}
    return types.SimpleNamespace(**fns)


def loss_set(impl: str):
    """The ``losses=`` argument of train_step for an impl name (None: fastadvseg, the pipeline's default)."""
    if impl == "fastadvseg":
        return None
    if impl in ("eager", "compile"):
        return reference_losses(compiled=impl == "compile")
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


# --- the pipeline's step ------------------------------------------------------------------------------------------

def build_pipeline(shape: Shape, device: torch.device, seed: int = 0, model: Optional[str] = None, **config):
    """(cfg, nets, batch) as ``python -m fastadvseg.train`` builds them, at ``shape`` (N labelled + N unlabelled
    images of H x W, C classes), mode semi with L_semi on from the first step; everything else the defaults
    (``model``: another segmenter than the default deeplabv2_compact; ``config``: other TrainConfig fields)."""
    from fastadvseg.config import TrainConfig
    from fastadvseg.data.base import IMAGENET_MEAN, IMAGENET_STD
    from fastadvseg.utils.builders import build_models, build_optimizers
    from fastadvseg.utils.step import Nets

    cfg = TrainConfig(crop_size=(shape.h, shape.w), batch_size=shape.n, semi_start=0, seed=seed, device=device.type)
    if model:
        cfg.model = model
    for key, value in config.items():
        setattr(cfg, key, value)
    bundle = types.SimpleNamespace(num_classes=shape.c, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    G, D = build_models(cfg, bundle, device, log=lambda *a, **k: None, pretrained=False)
    G.train(), D.train()
    opt_g, opt_d = build_optimizers(cfg, G, D)
    nets = Nets(G, D, D_raw=D, opt_g=opt_g, opt_d=opt_d)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, shape.c, (shape.n, shape.h, shape.w), generator=g)
    labels[torch.rand(shape.n, shape.h, shape.w, generator=g) < IGNORE_FRACTION] = IGNORE
    batch = (torch.randn(shape.n, 3, shape.h, shape.w, generator=g).to(device), labels.to(device),
             torch.randn(shape.n, 3, shape.h, shape.w, generator=g).to(device))
    return cfg, nets, batch


def pipeline_steps(shape: Shape, device: torch.device, impls: Sequence[str]) -> Dict[str, Callable[[], None]]:
    """One zero-argument callable per impl: one ``train_step`` of its own G, D and optimizers (same seed)."""
    return {impl: _pipeline_step(shape, device, impl) for impl in impls}


def _pipeline_step(shape: Shape, device: torch.device, impl: str) -> Callable[[], None]:
    from fastadvseg.utils.step import train_step

    cfg, nets, batch = build_pipeline(shape, device)
    losses = loss_set(impl)
    counter = iter(range(10 ** 9))
    return lambda: train_step(cfg, nets, next(counter), *batch, losses=losses)


def loss_steps(shape: Shape, device: torch.device, impls: Sequence[str]) -> Dict[str, Callable[[], None]]:
    """The issue's step: labelled + unlabelled ``generator_loss`` summed, one backward, leaves' .grad set to None.
    ``eager`` is benchmarks/reference_ops.generator_loss (as in the per-op tables), ``compile`` that compiled."""
    g = torch.Generator().manual_seed(0)
    n, c, h, w = shape.n, shape.c, shape.h, shape.w
    y = torch.randint(0, c, (n, h, w), generator=g)
    y[torch.rand(n, h, w, generator=g) < IGNORE_FRACTION] = IGNORE
    y = y.to(device)
    leaves = [t.to(device).requires_grad_() for t in (torch.randn(n, c, h, w, generator=g),
                                                      torch.randn(n, 1, h, w, generator=g) + 1,
                                                      torch.randn(n, c, h, w, generator=g),
                                                      torch.randn(n, 1, h, w, generator=g) + 1)]
    x, z, xu, zu = leaves
    fns = {}
    for impl in impls:
        if impl == "fastadvseg":
            import fastadvseg as fas

            def gen(x, z, y, lambda_adv, lambda_semi=0.0):
                return fas.generator_loss(x, z, y, lambda_adv=lambda_adv, lambda_semi=lambda_semi,
                                          threshold=THRESHOLD).total
        elif impl in ("eager", "compile"):
            gen = R.generator_loss if impl == "eager" else torch.compile(R.generator_loss)
        else:
            raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")

        def step(gen=gen):
            loss = gen(x, z, y, LAMBDA_ADV) + gen(xu, zu, None, LAMBDA_SEMI_ADV, LAMBDA_SEMI)
            loss.backward()
            for t in leaves:
                t.grad = None
        fns[impl] = step
    return fns


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def resident_mib() -> Optional[float]:
    """The process's resident set now (Linux), MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_mib() -> Optional[float]:
    """The process's resident-set high-water mark (Linux ``VmHWM``), MiB. Not ``ru_maxrss``: Linux carries that
    over from the process that started this one (it keeps the old memory's peak across ``execve``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


def time_blocks(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int, block: int):
    """{impl: (seconds per step, minor faults per step)}: each round runs every impl for ``block`` + 1 consecutive
    steps (the first not recorded), the order rotating from round to round."""
    names = list(fns)
    out = {k: ([], []) for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i in range(block + 1):
                sync(device)
                f0, t0 = minor_faults(), time.perf_counter()
                fns[name]()
                sync(device)
                t, f = time.perf_counter() - t0, minor_faults() - f0
                if i:
                    out[name][0].append(t)
                    out[name][1].append(f)
    return out


def run_step(kind: str, shape: Shape, device: torch.device, impls: Sequence[str], rounds: int,
             block: Optional[int] = None, budget_s: float = 0.0, log=print, keep_samples: bool = False) -> List[dict]:
    """Rows of one step kind at one shape: a first step (compilation for ``compile``) and a second one (its time
    sizes the blocks) untimed, then ``rounds`` of blocks of ``block`` timed steps (default: about ``budget_s`` of
    steps per impl, within :data:`BLOCK_RANGE`). ``keep_samples``: the rows keep every step's seconds and faults
    (``samples_s``, ``faults``)."""
    make = pipeline_steps if kind == "pipeline" else loss_steps
    images = 2 * shape.n  # a labelled and an unlabelled batch per step
    rows, fns, step_s = [], {}, 0.0
    for impl in impls:
        row = {"step": kind, "shape": shape.name, "N": shape.n, "C": shape.c, "H": shape.h, "W": shape.w,
               "impl": impl, "status": "ok", "images_per_step": images}
        try:
            fn = make(shape, device, [impl])[impl]
            for i in range(2):
                sync(device)
                t0 = time.perf_counter()
                fn()  # the first step: compilation, lazy initialisation, the allocator's first growth
                sync(device)
                if i == 0:
                    row["first_step_s"] = time.perf_counter() - t0
                else:
                    step_s = max(step_s, time.perf_counter() - t0)
            fns[impl] = fn
        except Exception as exc:  # an impl that cannot run here is recorded, the others still run
            row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
    if block is None:
        lo, hi = BLOCK_RANGE
        block = max(lo, min(hi, int(budget_s / max(rounds * step_s, 1e-9))))
    samples = time_blocks(fns, device, rounds, block) if fns else {}
    for row in rows:
        if row["impl"] in samples:
            row["samples_s"], row["faults"] = samples[row["impl"]]
            row["rounds"], row["block"] = rounds, block
    finish(rows)
    for row in rows:
        if not keep_samples:
            row.pop("samples_s", None), row.pop("faults", None)
        log(_line(row))
    return rows


def finish(rows: List[dict]) -> None:
    """Order statistics of each row's ``samples_s`` and ``faults``, images/s, and the process's resident set."""
    rss = resident_mib()
    for row in rows:
        if row["status"] != "ok" or "samples_s" not in row:
            continue
        row.update(summarize(row["samples_s"]))
        f = order_stats([float(v) for v in row["faults"]], "faults")
        row.update(faults_median=f["median_faults"], faults_p10=f["p10_faults"], faults_p90=f["p90_faults"])
        row["images_per_s"] = row["images_per_step"] / (row["median_ms"] / 1e3)
        if rss is not None:
            row.setdefault("rss_after_MiB", rss)  # the process's, after every impl's steps (each has its own nets)


def _line(row: dict) -> str:
    head = f"# train-step {row['step']:<8} {row['shape']:>10} {row['impl']:<10}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return (f"{head} {row['median_ms']:9.1f} ms (p10 {row['p10_ms']:.1f}, p90 {row['p90_ms']:.1f}, n={row['n']}), "
            f"{row['faults_median']:.0f} faults/step (p90 {row['faults_p90']:.0f})")


def add_ratios(rows: List[dict], key: str = "shape") -> None:
    """x eager and x compile of each row (ratios of medians within this run, same step kind and ``key``), with the
    range their p10-p90 spreads allow and whether the spreads overlap (benchmarks/quality.py's convention)."""
    from .timing import ratio_range

    base = {(r["step"], r[key], r["impl"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for b in ("eager", "compile"):
            ref = base.get((r["step"], r[key], b))
            r[f"speedup_vs_{b}"] = ref["median_ms"] / r["median_ms"] if ref else None
            if ref:
                r[f"speedup_vs_{b}_range"] = ratio_range(ref, r)
                r[f"speedup_vs_{b}_overlap"] = not (ref["p10_ms"] > r["p90_ms"] or r["p10_ms"] > ref["p90_ms"])


def run_train_step(device: torch.device, *, tiny: bool = False, impls: Sequence[str] = IMPLS,
                   steps: Sequence[str] = STEPS, shapes: Optional[Sequence[Shape]] = None, log=print) -> dict:
    """Every step kind x shape x impl (:data:`STEP_SHAPES` of the device, or TINY), in this process and under its
    allocator (the report's header says which)."""
    size = "tiny" if tiny else device.type
    shapes = list(shapes or STEP_SHAPES[size])
    rounds, budget_s = SCHEDULE[size]
    rows = []
    for shape in shapes:
        for kind in steps:
            torch._dynamo.reset()  # compile per shape and step: no recompilation limit, no stale graphs
            rows += run_step(kind, shape, device, impls, rounds, budget_s=budget_s, log=log)
    add_ratios(rows)
    from fastadvseg.utils import allocator

    return {"rows": rows, "rounds": rounds, "budget_s": budget_s, "threads": torch.get_num_threads(),
            "allocator": allocator.in_effect().description,
            "models": "G = fastadvseg.models.build_segmenter('deeplabv2_compact'), D = FCDiscriminator(ndf=32), "
                      "built by fastadvseg.utils.builders.build_models from the pipeline's default TrainConfig"}


# --- --allocators: the same steps under each allocator, a fresh process each ------------------------------------

# what each child process times: (step kind, shape); the pipeline step at the Cityscapes shape takes seconds per
# step on a CPU, so the comparison leaves it to --train-step
ALLOCATOR_JOBS = {"cpu": (("pipeline", VOC_SMALL), ("losses", VOC_SMALL), ("losses", CITYSCAPES)),
                  "tiny": (("pipeline", TINY), ("losses", TINY))}
ALLOCATOR_IMPLS = ("fastadvseg", "eager")
ALLOCATOR_SCHEDULE = {"cpu": (2, 4), "tiny": (1, 2)}  # (rounds of processes, steps per block)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def allocator_settings(preload: Sequence[str] = ()) -> Dict[str, dict]:
    """{name: {"env": the child's environment or None (not available), "note": ...}}: the C library's defaults,
    ``steady`` (fastadvseg/utils/allocator.py) and jemalloc / tcmalloc where installed or given in ``preload``
    (paths of their shared libraries), preloaded with the settings ``--allocator jemalloc|tcmalloc`` uses."""
    from fastadvseg.utils import allocator as A

    plain = A.plain_env()
    for key in A.environment_settings(plain):  # the comparison sets the allocator itself
        del plain[key]
    out = {"system": {"env": plain, "note": "the C library's defaults"},
           "steady": {"env": plain, "note": A.STEADY_TEXT}}
    given = {}
    for path in preload:
        name = next((n for n, stems in A.LIBRARIES.items() if any(f"lib{s}" in os.path.basename(path) for s in stems)),
                    None)
        if name is None:
            raise ValueError(f"--preload {path}: not a jemalloc or tcmalloc library")
        given[name] = path
    for name in A.LIBRARIES:
        path = given.get(name) or A.find_library(name)
        out[name] = ({"env": A.preload_env(name, path, plain), "note": f"{path} preloaded"} if path else
                     {"env": None, "note": f"not installed (apt install {A._package(name)}, or --preload PATH)"})
    return out


def run_allocators(device: torch.device, *, tiny: bool = False, threads: Optional[int] = None,
                   preload: Sequence[str] = (), impls: Sequence[str] = ALLOCATOR_IMPLS, log=print) -> dict:
    """The steps of :data:`ALLOCATOR_JOBS` with each allocator of :func:`allocator_settings`, each run in a fresh
    process (``python -m benchmarks.train_step``); the processes alternate over rounds (a change in machine load
    hits every allocator alike) and the samples of an allocator's rounds are pooled."""
    if device.type != "cpu":
        return {"skipped": "page faults and the C library's allocator concern host memory: CPU only"}
    size = "tiny" if tiny else "cpu"
    rounds, block = ALLOCATOR_SCHEDULE[size]
    jobs = [[kind, list(shape)] for kind, shape in ALLOCATOR_JOBS[size]]
    settings = allocator_settings(preload)
    names = [n for n, s in settings.items() if s["env"] is not None]
    pooled: Dict[tuple, dict] = {}
    described = {n: s["note"] for n, s in settings.items()}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            spec = {"allocator": name, "jobs": jobs, "impls": list(impls), "block": block,
                    "threads": threads or torch.get_num_threads()}
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", json.dumps(spec)], cwd=ROOT,
                                      env=settings[name]["env"], capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
                child = json.loads(proc.stdout.strip().splitlines()[-1])
            except Exception as exc:  # recorded; the other allocators still run
                described[name] = f"FAILED: {type(exc).__name__}: {exc}"[:240]
                continue
            described[name] = child["allocator"]
            for row in child["rows"]:
                key = (name, row["step"], row["shape"], row["impl"])
                into = pooled.setdefault(key, dict(row, allocator=name, samples_s=[], faults=[], rss_after_MiB=0.0,
                                                   peak_rss_MiB=0.0))
                if row["status"] != "ok":
                    into["status"] = row["status"]
                    continue
                into["samples_s"] += row["samples_s"]
                into["faults"] += row["faults"]
                into["rss_after_MiB"] = max(into["rss_after_MiB"], row.get("rss_after_MiB") or 0.0)
                into["peak_rss_MiB"] = max(into["peak_rss_MiB"], child["peak_rss_MiB"] or 0.0)
    rows = list(pooled.values())
    finish(rows)
    for row in rows:
        row.pop("samples_s", None), row.pop("faults", None)
    order = {n: i for i, n in enumerate(settings)}
    rows.sort(key=lambda r: (r["step"] != "pipeline", r["shape"], r["impl"], order[r["allocator"]]))
    for row in rows:
        log(f"# allocators {row['allocator']:<9}" + _line(row)[len("# train-step"):])
    return {"rows": rows, "allocators": described, "rounds": rounds, "block": block,
            "threads": threads or torch.get_num_threads(), "impls": list(impls),
            "jobs": [f"{kind} at {Shape(*shape)}" for kind, shape in jobs]}


def _child(spec: dict) -> dict:
    """One process of :func:`run_allocators`: set the allocator, time the jobs, return rows with their samples."""
    from fastadvseg.utils import allocator

    alloc = allocator.configure(spec["allocator"])  # system: unchanged; jemalloc/tcmalloc: already preloaded
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    rows = []
    for kind, shape in spec["jobs"]:
        torch._dynamo.reset()
        rows += run_step(kind, Shape(*shape), device, spec["impls"], 1, spec["block"], log=lambda s: None,
                         keep_samples=True)
    return {"allocator": alloc.description, "rows": rows, "peak_rss_MiB": peak_resident_mib()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step",
                                description="One process of --allocators (benchmarks/report.py): a JSON spec in, "
                                            "a JSON line out.")
    p.add_argument("spec")
    args = p.parse_args(argv)
    print(json.dumps(_child(json.loads(args.spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
