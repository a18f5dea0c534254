"""Training iterations timed as a training loop runs them: the pipeline's own step,
:func:`fastadvseg.utils.step.train_step`, with other losses; the losses alone; the allocators; the authors' loop.
A step allocates the logits, D's maps and all gradients afresh, so what the allocator does with a freed 17 MB
buffer (keep it, or fault it in again page by page) is part of its cost.

Impls (:func:`loss_set`, the ``losses=`` of ``train_step``): ``fastadvseg`` (backend auto), ``fastadvseg_compiled``
(its functions under ``torch.compile``), ``eager`` (benchmarks/reference_ops.py, returning what fastadvseg's functions
return), ``compile`` (those compiled); and ``authors``, the port of the authors' iteration (benchmarks/authors_loop.py)
on the same G, D, optimizers and batch. A ``pipeline`` step (:func:`loop_step`) is one iteration of
``python -m fastadvseg.train``'s loop: learning rates set, the batch moved from the host, ``train_step``, the values
read back. G and D come from ``fastadvseg.utils.builders`` with the default TrainConfig at the shape's crop and batch,
mode semi with L_semi on. A ``losses`` step: a labelled plus an unlabelled ``generator_loss``, summed, one backward,
the leaves' ``.grad`` set to None. :func:`run_step` times them; :func:`run_part` is ``--train-step``, ``--e2e``,
``--e2e-compile`` and ``--authors-loop``, :func:`run_allocators` ``--allocators`` (a process per allocator).
"""
from __future__ import annotations

import itertools
import os
import resource
import time
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import cases as C
from . import reference_ops as R
from .cases import IGNORE, IGNORE_FRACTION
from .env import run_child, status_text
from .shapes import CITYSCAPES, E2E_CPU, TINY, VOC, VOC_SMALL, Shape
from .targets import add_ratios
from .timing import order_stats, summarize, sync

STEP_SHAPES = {"cpu": (VOC_SMALL, CITYSCAPES), "cuda": (VOC, CITYSCAPES), "tiny": (TINY,)}
E2E_SHAPES = {"cpu": (E2E_CPU,), "cuda": (VOC,), "tiny": (TINY,)}
AUTHORS_SHAPES = {"cpu": (VOC_SMALL,), "cuda": (VOC,), "tiny": (TINY,)}  # the CPU target shape; the paper's N=10
E2E_SEGMENTER = {"cpu": "deeplabv2_compact", "cuda": "deeplabv2_resnet101"}  # the paper's G on a GPU
LOSS_NAMES = ("softmax2d", "generator_loss", "cross_entropy2d", "one_hot2d", "discriminator_loss")
# (rounds, seconds of timed steps per impl): each block gets as many steps as that allows, 2 to 8 (the default
# pipeline step takes about 1 s at voc-n2 and 5 s at cityscapes on 2 idle CPU cores; the losses alone 5-150 ms)
SCHEDULE = {"cpu": (3, 20.0), "cuda": (3, 5.0), "tiny": (2, 0.0)}
BLOCK_RANGE = (2, 8)


# --- the loss functions the step calls ----------------------------------------------------------------------------

def _at(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """The user's composition when the step asks the losses to upsample: ``F.interpolate`` first."""
    return x if size is None else R.upsample(x, size, align_corners)


def _ref_generator_loss(logits, d_logits, target=None, *, lambda_adv, lambda_semi=0.1, threshold=0.2,
                        ignore_index=IGNORE, size=None, align_corners=False, backend=None):
    """fastadvseg.generator_loss's result from the plain composition of benchmarks/reference_ops.py."""
    from fastadvseg import GeneratorLossOutput as _GenOut

    logits, d_logits = _at(logits, size, align_corners), _at(d_logits, size, align_corners)
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


def _ref_cross_entropy(x, y, ignore_index=IGNORE, reduction="mean", size=None, align_corners=False, backend=None):
    if reduction != "mean":
        raise ValueError(f"the eager step's cross_entropy2d takes reduction='mean' only, got {reduction!r}")
    return R.cross_entropy2d(_at(x, size, align_corners), y, ignore_index)


def _ref_discriminator_loss(d_fake, d_real, *, ignore_mask_fake=None, ignore_mask_real=None, size=None,
                            align_corners=False, backend=None):
    return (R.bce_with_logits2d(_at(d_fake, size, align_corners), 0.0, ignore_mask_fake)
            + R.bce_with_logits2d(_at(d_real, size, align_corners), 1.0, ignore_mask_real))


def loss_set(impl: str) -> Optional[types.SimpleNamespace]:
    """The ``losses=`` argument of ``train_step`` for an impl (None: fastadvseg, the pipeline's default). The eager
    functions accept ``backend=`` and ignore it; given ``size=``, they upsample their logits and D maps with
    ``F.interpolate`` first (the pipeline passes its 1/8 logits and D's own map when ``fused_upsampling`` is on)."""
    if impl == "fastadvseg":
        return None
    if impl == "fastadvseg_compiled":
        import fastadvseg as fas

        return types.SimpleNamespace(**{name: torch.compile(getattr(fas, name)) for name in LOSS_NAMES})
    if impl not in ("eager", "compile"):
        raise ValueError(f"unknown impl {impl!r}; choose from fastadvseg, fastadvseg_compiled, eager, compile")
    fns = {
        "softmax2d": lambda x, size=None, align_corners=False, backend=None: R.softmax2d(_at(x, size, align_corners)),
        "generator_loss": _ref_generator_loss,
        "cross_entropy2d": _ref_cross_entropy,
        "one_hot2d": lambda y, c, ignore_index=IGNORE, dtype=torch.float32, backend=None: R.one_hot2d(
            y, c, ignore_index, dtype),
        "discriminator_loss": _ref_discriminator_loss,
    }
    return types.SimpleNamespace(**{k: torch.compile(f) if impl == "compile" else f for k, f in fns.items()})


def build_pipeline(shape: Shape, device: torch.device, seed: int = 0, model: Optional[str] = None, **config):
    """(cfg, nets, batch) as ``python -m fastadvseg.train`` builds them, at ``shape`` (N labelled + N unlabelled
    images of H x W, C classes), mode semi with L_semi on from the first step; everything else the defaults
    (``model``: another segmenter than the default; ``config``: other TrainConfig fields). The batch (images,
    labels, unlabelled images) is on the host, seeded."""
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
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, shape.c, (shape.n, shape.h, shape.w), generator=g)
    labels[torch.rand(shape.n, shape.h, shape.w, generator=g) < IGNORE_FRACTION] = IGNORE
    batch = (torch.randn(shape.n, 3, shape.h, shape.w, generator=g), labels,
             torch.randn(shape.n, 3, shape.h, shape.w, generator=g))
    return cfg, Nets(G, D, D_raw=D, opt_g=opt_g, opt_d=opt_d), batch


def loop_step(impl: str, shape: Shape, device: torch.device, segmenter: Optional[str] = None) -> Callable[[], None]:
    """A zero-argument callable: one iteration of the training loop with ``impl``'s losses, on its own G, D and
    optimizers (same seed, so the same initial weights for every impl)."""
    if impl == "authors":
        from .authors_loop import authors_step

        return authors_step(shape, device, segmenter)
    from fastadvseg.utils.builders import set_lr
    from fastadvseg.utils.step import train_step

    cfg, nets, batch = build_pipeline(shape, device, model=segmenter)
    losses, counter = loss_set(impl), itertools.count()

    def step():
        i = next(counter) % cfg.steps
        set_lr(nets.opt_g, cfg.lr, i, cfg.steps, cfg.power)  # the pipeline's loop sets the rates every step
        set_lr(nets.opt_d, cfg.lr_d, i, cfg.steps, cfg.power)
        out = train_step(cfg, nets, i, *(t.to(device) for t in batch), num_classes=shape.c, losses=losses)
        torch.stack(list(out.values())).float().tolist()  # the loop reads the step's values back (one sync)
    return step


def loss_step(impl: str, shape: Shape, device: torch.device, segmenter: Optional[str] = None) -> Callable[[], None]:
    """The per-op cases' labelled and unlabelled ``generator_loss`` summed, one backward, the leaves' ``.grad`` set
    to None, as a training step leaves them."""
    cases = C.select_cases(["generator_loss"])
    inputs = [C.make_inputs(case, shape, torch.float32, device, seed) for seed, case in enumerate(cases)]
    fns = [C.impl_function(case, "auto" if impl == "fastadvseg" else impl) for case in cases]
    leaves = [i[k] for i, case in zip(inputs, cases) for k in case.grads]

    def step():
        sum(fn(i) for fn, i in zip(fns, inputs)).backward()
        for t in leaves:
            t.grad = None
    return step


def _status_mib(field: str) -> Optional[float]:
    """``VmRSS`` (the resident set now) or ``VmHWM`` (its high-water mark; not ``ru_maxrss``, which Linux carries over
    from the process that started this one), MiB; None off Linux."""
    from .memory import status_bytes

    try:
        return status_bytes(field) / 2**20
    except OSError:
        return None


def _timed(fn: Callable[[], object], device: torch.device) -> Tuple[float, int]:
    """Seconds and minor page faults (every thread of the process) of one step."""
    sync(device)
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def run_step(kind: str, shape: Shape, device: torch.device, impls: Sequence[str], rounds: int,
             block: Optional[int] = None, budget_s: float = 0.0, segmenter: Optional[str] = None, log=print,
             keep_samples: bool = False) -> List[dict]:
    """Rows of one step kind (``pipeline`` or ``losses``) at one shape: per impl a first step (compilation for the
    compiled ones) and a second one (its time sizes the blocks) untimed, then ``rounds`` of blocks of ``block`` + 1
    consecutive steps per impl, the first not recorded, the order rotating (``block`` default: about ``budget_s`` of
    steps per impl, within :data:`BLOCK_RANGE`). ``keep_samples``: the rows keep every step's seconds and faults."""
    make = loop_step if kind == "pipeline" else loss_step
    rows, fns, step_s = [], {}, 0.0
    for impl in impls:
        row = {"step": kind, "shape": shape.name, "N": shape.n, "C": shape.c, "H": shape.h, "W": shape.w,
               "impl": impl, "status": "ok", "images_per_step": 2 * shape.n}  # a labelled and an unlabelled batch
        try:
            fns[impl] = make(impl, shape, device, segmenter)
            row["first_step_s"] = _timed(fns[impl], device)[0]  # compilation, lazy initialisation, allocator growth
            step_s = max(step_s, _timed(fns[impl], device)[0])
        except Exception as exc:  # an impl that cannot run here is recorded, the others still run
            fns.pop(impl, None)
            row["status"] = status_text(exc)
        rows.append(row)
    lo, hi = BLOCK_RANGE
    block = block or max(lo, min(hi, int(budget_s / max(rounds * step_s, 1e-9))))
    names = list(fns)
    for row in rows:
        if row["impl"] in fns:
            row.update(samples_s=[], faults=[], rounds=rounds, block=block)
    by = {row["impl"]: row for row in rows}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i in range(block + 1):
                t, f = _timed(fns[name], device)
                if i:  # the first step after a switch of impl is not recorded
                    by[name]["samples_s"].append(t)
                    by[name]["faults"].append(f)
    finish(rows)
    for row in rows:
        if not keep_samples:
            row.pop("samples_s", None), row.pop("faults", None)
        log(_line(row))
    return rows


def finish(rows: List[dict]) -> None:
    """Order statistics of each row's ``samples_s`` and ``faults``, images/s, and the process's resident set."""
    rss = _status_mib("VmRSS")
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
    head = f"# {row['step']:<8} {row['shape']:>10} {row['impl']:<19}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return (f"{head} {row['median_ms']:9.1f} ms (p10 {row['p10_ms']:.1f}, p90 {row['p90_ms']:.1f}, n={row['n']}), "
            f"{row['faults_median']:.0f} faults/step (p90 {row['faults_p90']:.0f})")


def _models(segmenter: Optional[str]) -> str:
    from fastadvseg.config import TrainConfig

    cfg = TrainConfig()
    return (f"G = fastadvseg.models.build_segmenter({segmenter or cfg.model!r}), D = FCDiscriminator(ndf={cfg.ndf}), "
            "built by fastadvseg.utils.builders.build_models from the pipeline's default TrainConfig")


# report part: (shapes per size, step kinds, impls, the baselines of its ratio columns, G per device type; none:
# the pipeline's default)
PARTS = {
    "train_step": (STEP_SHAPES, ("pipeline", "losses"), ("fastadvseg", "eager", "compile"), ("eager", "compile"), {}),
    "e2e": (E2E_SHAPES, ("pipeline",), ("fastadvseg", "eager"), ("eager",), E2E_SEGMENTER),
    "e2e_compile": (E2E_SHAPES, ("pipeline",), ("fastadvseg", "fastadvseg_compiled", "eager", "compile"),
                    ("fastadvseg", "eager"), E2E_SEGMENTER),
    "authors_loop": (AUTHORS_SHAPES, ("pipeline",), ("authors", "fastadvseg", "fastadvseg_compiled", "eager"),
                     ("authors",), E2E_SEGMENTER),
}


def run_part(part: str, device: torch.device, *, tiny: bool = False, segmenter: Optional[str] = None,
             no_compile: bool = False, log=print) -> dict:
    """One training part of the report (:data:`PARTS`): every step kind x shape x impl, with the ratios of medians
    to the part's baselines, in this process and under its allocator. ``e2e`` adds what its target judges
    (``speedup``: images/s with fastadvseg's losses over the eager ones); ``e2e_compile`` the graph breaks."""
    from fastadvseg.utils import allocator

    shapes, kinds, impls, baselines, default_g = PARTS[part]
    size = "tiny" if tiny else device.type
    rounds, budget_s = SCHEDULE[size]
    segmenter = segmenter or default_g.get(device.type)
    out = {"rows": [], "baselines": list(baselines), "rounds": rounds, "threads": torch.get_num_threads(),
           "allocator": allocator.in_effect().description, "models": _models(segmenter)}
    if part == "e2e_compile":
        out.update(graph_breaks(shapes[size][0], device, segmenter))
    for shape in shapes[size]:
        for kind in kinds:
            torch._dynamo.reset()  # compile per shape and step: no recompilation limit, no stale graphs
            out["rows"] += run_step(kind, shape, device, [i for i in impls if not (no_compile and "compile" in i)],
                                    rounds, budget_s=budget_s, segmenter=segmenter, log=log)
    add_ratios(out["rows"], ("step", "shape"), baselines)
    if part == "e2e":
        import fastadvseg

        by, shape = {r["impl"]: r for r in out["rows"]}, shapes[size][0]
        out.update(shape=f"N={shape.n}+{shape.n}, C={shape.c}, {shape.h}x{shape.w}", dtype="float32",
                   fused=by["fastadvseg"], reference=by["eager"], speedup=by["fastadvseg"].get("speedup_vs_eager"),
                   fused_backend="auto -> " + ",".join(fastadvseg.available_backends(device)[:1]))
    return out


def graph_breaks(shape: Shape, device: torch.device, segmenter: Optional[str] = None) -> dict:
    """The graph breaks ``torch._dynamo.explain`` finds in each fastadvseg loss call of one pipeline step (0 when
    each traces as one graph)."""
    import fastadvseg as fas
    from fastadvseg.utils.step import train_step

    found = []

    def explained(name):
        def call(*args, **kwargs):
            found.append(torch._dynamo.explain(getattr(fas, name))(*args, **kwargs))
            return getattr(fas, name)(*args, **kwargs)
        return call

    cfg, nets, batch = build_pipeline(shape, device, model=segmenter)
    try:
        train_step(cfg, nets, 0, *(t.to(device) for t in batch), num_classes=shape.c,
                   losses=types.SimpleNamespace(**{n: explained(n) for n in LOSS_NAMES}))
    except Exception as exc:  # reported, not fatal
        return {"graph_breaks": None, "break_reasons": [], "explain_status": status_text(exc)}
    finally:
        torch._dynamo.reset()
    reasons = list(dict.fromkeys(str(getattr(r, "reason", r)).splitlines()[0][:160]
                                 for e in found for r in e.break_reasons))
    return {"graph_breaks": sum(e.graph_break_count for e in found), "graphs": sum(e.graph_count for e in found),
            "break_reasons": reasons[:5], "explain_status": "ok"}


# --- --allocators: the same steps under each allocator, a fresh process each ------------------------------------

# what each child process times: (step kind, shape); the pipeline step at the Cityscapes shape takes seconds per
# step on a CPU, so the comparison leaves it to --train-step
ALLOCATOR_JOBS = {"cpu": (("pipeline", VOC_SMALL), ("losses", VOC_SMALL), ("losses", CITYSCAPES)),
                  "tiny": (("pipeline", TINY), ("losses", TINY))}
ALLOCATOR_IMPLS = ("fastadvseg", "eager")
ALLOCATOR_SCHEDULE = {"cpu": (2, 4), "tiny": (1, 2)}  # (rounds of processes, steps per block)


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
        name = next((n for n in A.LIBRARIES if n in os.path.basename(path)), None)  # libjemalloc.so.2, libtcmalloc*
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
    process; the processes alternate over rounds and the samples of an allocator's rounds are pooled."""
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
                child = run_child("benchmarks.train_step", spec, settings[name]["env"], timeout=1800)
            except Exception as exc:  # recorded; the other allocators still run
                described[name] = f"FAILED: {status_text(exc)}"
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
        log(f"# allocators {row['allocator']:<9}" + _line(row)[1:])
    return {"rows": rows, "allocators": described, "rounds": rounds, "block": block,
            "threads": threads or torch.get_num_threads(), "impls": list(impls),
            "jobs": [f"{kind} at {Shape(*shape)}" for kind, shape in jobs]}


def _child(spec: dict) -> dict:
    """One process of :func:`run_allocators`: set the allocator, time the jobs, return rows with their samples."""
    from fastadvseg.utils import allocator

    alloc = allocator.configure(spec["allocator"])  # system: unchanged; jemalloc/tcmalloc: already preloaded
    torch.set_num_threads(spec["threads"])
    rows = []
    for kind, shape in spec["jobs"]:
        torch._dynamo.reset()
        rows += run_step(kind, Shape(*shape), torch.device("cpu"), spec["impls"], 1, spec["block"],
                         log=lambda s: None, keep_samples=True)
    return {"allocator": alloc.description, "rows": rows, "peak_rss_MiB": _status_mib("VmHWM")}


if __name__ == "__main__":
    from .env import child_main

    child_main(_child)
