"""``--call-overhead``: what one loss call costs beyond its arithmetic: forward+backward at the smoke shape, where
the kernels finish in microseconds. Per op with a backward, timed in turns: ``eager`` (the plain composition),
``<backend>`` (``fastadvseg.<op>(..., backend=...)`` as users call it) and ``<backend> op alone``: the registered
op ``torch.ops.fastadvseg.<op>`` that call runs, called directly with the arguments the call gave it (recorded once
under a dispatch mode), and ``torch.autograd.grad`` of its differentiable outputs w.r.t. its differentiable tensor
arguments: the op and its autograd rule without the Python around them. ``reference`` has no registered op. G's
loss path (``generator_path[...]``, D's convolutions between two ops) is not one call and has no row here.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

OP_ALONE = " op alone"


class _OpCalls(TorchDispatchMode):
    """Records every ``fastadvseg::*`` op call (the op and its arguments) made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastadvseg":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def op_alone(forward: Callable) -> Callable:
    """The registered op(s) ``forward`` calls, recorded at the first call and replayed with the same arguments,
    then their backward."""
    calls: list = []

    def run(inputs):
        if not calls:
            with _OpCalls() as rec:
                forward(inputs)
            if not rec.calls:
                raise LookupError("no registered op called")
            calls.extend(rec.calls)
        for func, args, kwargs in calls:
            outs = func(*args, **kwargs)
            outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs])
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            if outs and wrt:
                torch.autograd.grad(sum(o.float().sum() for o in outs), wrt)

    return run


def run_overhead(device: torch.device, case_names: Optional[Sequence[str]], backends: List[str], *,
                 repeats: int = 200, budget_s: float = 0.5, log: Callable[[str], None] = print) -> dict:
    """Per-call times (median and p10-p90, microseconds) of every impl above, per op; a row per op x impl."""
    from .cases import forward_backward, impl_function, make_inputs, select_cases
    from .env import status_text
    from .shapes import SMOKE
    from .timing import order_stats, time_interleaved

    rows = []
    for case in select_cases(case_names):
        if not case.has_backward or "d_net" in case.inputs:  # G's loss path runs D's convolutions: not one call
            continue
        sets = [make_inputs(case, SMOKE, torch.float32, device, seed) for seed in range(4)]
        fns: Dict[str, Callable] = {"eager": forward_backward(case, impl_function(case, "eager"))}
        for b in backends:
            fns[b] = forward_backward(case, impl_function(case, b))
            if b != "reference":  # plain PyTorch: no registered op
                fns[b + OP_ALONE] = op_alone(impl_function(case, b))
        timed = {}
        for impl, fn in fns.items():
            try:
                fn(sets[0])
                timed[impl] = (lambda f: lambda k: f(sets[k % len(sets)]))(fn)
            except Exception as exc:  # recorded, the run goes on
                rows.append({"op": case.name, "impl": impl, "status": status_text(exc)})
        try:
            samples = time_interleaved(timed, device, repeats=repeats, budget_s=budget_s,
                                       min_repeats=min(20, repeats))
        except Exception as exc:  # a failure after a good first call: recorded for the op, the run goes on
            samples = {}
            rows += [{"op": case.name, "impl": impl, "status": status_text(exc)} for impl in timed]
        for impl, times in samples.items():
            row = {"op": case.name, "impl": impl, "status": "ok", **order_stats([t * 1e6 for t in times], "us")}
            rows.append(row)
            log(f"   overhead {case.name:<27} {impl:<20} {row['median_us']:8.1f} us  "
                f"(p10 {row['p10_us']:.1f}, p90 {row['p90_us']:.1f}, n={row['n']})")
    return {"shape": f"N={SMOKE.n}, C={SMOKE.c}, {SMOKE.h}x{SMOKE.w}", "dtype": "float32", "device": device.type,
            "rows": rows}
