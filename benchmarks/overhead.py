"""What one loss call costs beyond its arithmetic: forward+backward at the smoke shape (N=2, C=5, 17x23, float32),
where every kernel finishes in microseconds, so the time is the Python and autograd work around it.

Per op with a backward, timed in turns in one process (``timing.time_interleaved``):

* ``eager``: the plain PyTorch composition (benchmarks/reference_ops.py);
* ``<backend>``: ``fastadvseg.<op>(..., backend=...)`` as a user calls it (eager calls run the op's implementation
  and autograd rule directly);
* ``<backend> via torch.ops``: the same call forced through the registered op ``torch.ops.fastadvseg.<op>`` and
  PyTorch's dispatcher, the path that compiled, exported or intercepted code takes.

The difference between the last two is what the dispatcher costs per call; ``<backend>`` minus ``eager`` is what
fastadvseg's op layer costs over the composition it replaces (at large shapes the fused kernel wins that back).
On CUDA the times are CUDA-event intervals; at this shape the GPU waits for the host, so they measure the host.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

VIA_OPS = " via torch.ops"


def _through_dispatcher(fn: Callable) -> Callable:
    """``fn`` with fastadvseg's eager calls sent through ``torch.ops.fastadvseg.*``."""
    from fastadvseg import _ops

    def run(inputs):
        direct = _ops._plain_eager
        _ops._plain_eager = lambda args: False
        try:
            return fn(inputs)
        finally:
            _ops._plain_eager = direct

    return run


def run_overhead(device: torch.device, case_names: Optional[Sequence[str]], backends: List[str], *,
                 repeats: int = 200, budget_s: float = 0.5, log: Callable[[str], None] = print) -> dict:
    """Per-call times (median and p10-p90, microseconds) of every impl above, per op; a row per op x impl."""
    from .cases import forward_backward, impl_function, make_inputs, select_cases
    from .shapes import SMOKE
    from .timing import order_stats, time_interleaved

    rows = []
    for case in select_cases(case_names):
        if not case.has_backward:
            continue
        sets = [make_inputs(case, SMOKE, torch.float32, device, seed) for seed in range(4)]
        fns: Dict[str, Callable] = {"eager": forward_backward(case, impl_function(case, "eager"))}
        for b in backends:
            fns[b] = forward_backward(case, impl_function(case, b))
            if b != "reference":  # plain PyTorch: it has no registered op
                fns[b + VIA_OPS] = _through_dispatcher(fns[b])
        timed = {}
        for impl, fn in fns.items():
            try:
                fn(sets[0])
                timed[impl] = (lambda f: lambda k: f(sets[k % len(sets)]))(fn)
            except Exception as exc:  # recorded, the run goes on
                rows.append({"op": case.name, "impl": impl, "status": f"{type(exc).__name__}: {exc}"[:160]})
        samples = time_interleaved(timed, device, repeats=repeats, budget_s=budget_s, min_repeats=min(20, repeats))
        for impl, times in samples.items():
            row = {"op": case.name, "impl": impl, "status": "ok", **order_stats([t * 1e6 for t in times], "us")}
            rows.append(row)
            log(f"   overhead {case.name:<27} {impl:<24} {row['median_us']:8.1f} us  "
                f"(p10 {row['p10_us']:.1f}, p90 {row['p90_us']:.1f}, n={row['n']})")
    return {"shape": f"N={SMOKE.n}, C={SMOKE.c}, {SMOKE.h}x{SMOKE.w}", "dtype": "float32", "device": device.type,
            "rows": rows}
