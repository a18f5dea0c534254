"""Benchmark cases: for every public op, its inputs, its implementations and the bytes it must move.

An implementation ("impl") is one of

* ``eager``    -- :mod:`benchmarks.reference_ops`, the composition a user writes today;
* ``compile``  -- the same function under ``torch.compile`` (default mode, static shapes, compiled once per case);
* ``<backend>``-- ``fastadvseg`` with ``backend=<backend>``, for every name ``fas.available_backends(device)`` lists.

Directions: ``fwd`` is the training forward (inputs require grad, so every impl saves what its backward needs;
a fused kernel may already compute its gradients here); ``fwdbwd`` is that forward plus
``torch.autograd.grad`` of the loss (or of the map, with a fixed random upstream gradient, for ``softmax2d``)
w.r.t. every differentiable input. ``one_hot2d`` has no backward.

Byte model (:data:`BYTE_MODEL`): the fewest bytes the op must move through memory -- each input read once, each
output written once, gradients included for ``fwdbwd`` -- with P = N*H*W pixels, C classes, e the logits' element
size, labels int64 (8 bytes), masks bool (1 byte). Losses (scalars) count as 0. These are the same counts the
kernels state in their "Bytes moved" notes (fastadvseg/kernels/triton/*.py docstrings, fastadvseg/kernels/cuda/*.cu headers), minus
their per-block partial sums. Achieved bandwidth = bytes / median time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import reference_ops as R
from .shapes import Shape

IGNORE = R.IGNORE
LAMBDA_ADV = 0.01  # the paper's lambda_adv on a labelled batch
LAMBDA_SEMI_ADV = 0.001  # unlabelled batch
LAMBDA_SEMI = 0.1
THRESHOLD = 0.2
IGNORE_FRACTION = 0.05  # VOC-like: object boundaries are labelled 255

Inputs = Dict[str, object]  # tensors by name, plus "num_classes" (int) and "dtype" (the logits' dtype)


@dataclass(frozen=True)
class OpCase:
    name: str  # row name in the report
    api: str  # fastadvseg function it exercises
    inputs: Tuple[str, ...]  # which of x, y, z, z_real, m_real, gout it reads
    grads: Tuple[str, ...]  # differentiable inputs; empty: forward only
    eager: Callable[[Inputs], torch.Tensor]
    fused: Callable[[Inputs, str], torch.Tensor]
    byte_model: str  # the formula, as printed in the report
    fwd_bytes: Callable[[int, int, int], int]  # (P, C, e) -> bytes
    bwd_bytes: Callable[[int, int, int], int] = field(default=lambda p, c, e: 0)  # extra bytes for fwdbwd

    @property
    def has_backward(self) -> bool:
        return bool(self.grads)

    def bytes(self, shape: Shape, dtype: torch.dtype, direction: str) -> int:
        p, c, e = shape.pixels, shape.c, torch.empty((), dtype=dtype).element_size()
        total = self.fwd_bytes(p, c, e)
        return total + self.bwd_bytes(p, c, e) if direction == "fwdbwd" else total


def _fas():
    import fastadvseg  # imported late: report.py may have to set TRITON_INTERPRET first

    return fastadvseg


def _gen_labelled(i: Inputs, b: str) -> torch.Tensor:
    return _fas().generator_loss(i["x"], i["z"], i["y"], lambda_adv=LAMBDA_ADV, backend=b).total


def _gen_unlabelled(i: Inputs, b: str) -> torch.Tensor:
    return _fas().generator_loss(i["x"], i["z"], None, lambda_adv=LAMBDA_SEMI_ADV, lambda_semi=LAMBDA_SEMI,
                                 threshold=THRESHOLD, backend=b).total


CASES: Tuple[OpCase, ...] = (
    OpCase("softmax2d", "softmax2d", ("x", "gout"), ("x",),
           eager=lambda i: R.softmax2d(i["x"]),
           fused=lambda i, b: _fas().softmax2d(i["x"], backend=b),
           byte_model="fwd: read x, write p (2PCe); +bwd: read p or x and dp, write dx (+3PCe)",
           fwd_bytes=lambda p, c, e: 2 * p * c * e, bwd_bytes=lambda p, c, e: 3 * p * c * e),
    OpCase("cross_entropy2d", "cross_entropy2d", ("x", "y"), ("x",),
           eager=lambda i: R.cross_entropy2d(i["x"], i["y"]),
           fused=lambda i, b: _fas().cross_entropy2d(i["x"], i["y"], backend=b),
           byte_model="fwd: read x, y (PCe + 8P); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e: p * c * e + 8 * p, bwd_bytes=lambda p, c, e: p * c * e),
    OpCase("bce_with_logits2d", "bce_with_logits2d", ("z", "m_real"), ("z",),
           eager=lambda i: R.bce_with_logits2d(i["z"], 1.0, i["m_real"]),
           fused=lambda i, b: _fas().bce_with_logits2d(i["z"], 1.0, ignore_mask=i["m_real"], backend=b),
           byte_model="fwd: read z, mask (Pe + P); +bwd: write dz (+Pe)",
           fwd_bytes=lambda p, c, e: p * e + p, bwd_bytes=lambda p, c, e: p * e),
    OpCase("semi_cross_entropy2d", "semi_cross_entropy2d", ("x", "z"), ("x",),
           eager=lambda i: R.semi_cross_entropy2d(i["x"], i["z"], THRESHOLD),
           fused=lambda i, b: _fas().semi_cross_entropy2d(i["x"], i["z"], threshold=THRESHOLD, backend=b),
           byte_model="fwd: read x, z (PCe + Pe); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e: p * c * e + p * e, bwd_bytes=lambda p, c, e: p * c * e),
    OpCase("one_hot2d", "one_hot2d", ("y",), (),
           eager=lambda i: R.one_hot2d(i["y"], i["num_classes"], dtype=i["dtype"]),
           fused=lambda i, b: _fas().one_hot2d(i["y"], i["num_classes"], dtype=i["dtype"], backend=b),
           byte_model="fwd: read y, write one-hot (8P + PCe)",
           fwd_bytes=lambda p, c, e: 8 * p + p * c * e),
    OpCase("generator_loss[labelled]", "generator_loss", ("x", "y", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(i["x"], i["z"], i["y"], LAMBDA_ADV),
           fused=_gen_labelled,
           byte_model="fwd: read x, y, z (PCe + 8P + Pe); +bwd: write dx, dz (+PCe + Pe)",
           fwd_bytes=lambda p, c, e: p * c * e + 8 * p + p * e, bwd_bytes=lambda p, c, e: p * c * e + p * e),
    OpCase("generator_loss[unlabelled]", "generator_loss", ("x", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(i["x"], i["z"], None, LAMBDA_SEMI_ADV, LAMBDA_SEMI, THRESHOLD),
           fused=_gen_unlabelled,
           byte_model="fwd: read x, z (PCe + Pe); +bwd: write dx, dz (+PCe + Pe)",
           fwd_bytes=lambda p, c, e: p * c * e + p * e, bwd_bytes=lambda p, c, e: p * c * e + p * e),
    OpCase("discriminator_loss", "discriminator_loss", ("z", "z_real", "m_real"), ("z", "z_real"),
           eager=lambda i: R.discriminator_loss(i["z"], i["z_real"], i["m_real"]),
           fused=lambda i, b: _fas().discriminator_loss(i["z"], i["z_real"], ignore_mask_real=i["m_real"], backend=b),
           byte_model="fwd: read d_fake, d_real, real mask (2Pe + P); +bwd: write both grads (+2Pe)",
           fwd_bytes=lambda p, c, e: 2 * p * e + p, bwd_bytes=lambda p, c, e: 2 * p * e),
)
CASE_NAMES = tuple(c.name for c in CASES)


def select_cases(names: Optional[Sequence[str]] = None) -> List[OpCase]:
    """Cases by row name or by API name (``generator_loss`` selects both of its rows)."""
    if not names:
        return list(CASES)
    chosen = [c for c in CASES if c.name in names or c.api in names]
    unknown = set(names) - {c.name for c in chosen} - {c.api for c in chosen}
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(CASE_NAMES)}")
    return chosen


def make_inputs(case: OpCase, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """One input set: random logits (never zeros), VOC-like labels with a few ignored pixels, D-logits around +1
    (sigmoid(z) > THRESHOLD for most pixels, as with a trained D, but not all)."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for GPU-sized inputs
    n, c, h, w = shape.n, shape.c, shape.h, shape.w
    kw = {"generator": g, "device": device}
    y = torch.randint(0, c, (n, h, w), **kw)
    y[torch.rand(n, h, w, **kw) < IGNORE_FRACTION] = IGNORE
    make = {
        "x": lambda: torch.randn(n, c, h, w, **kw) * 2,
        "y": lambda: y,
        "z": lambda: torch.randn(n, 1, h, w, **kw) + 1,
        "z_real": lambda: torch.randn(n, 1, h, w, **kw) + 1,
        "m_real": lambda: y == IGNORE,
        "gout": lambda: torch.randn(n, c, h, w, **kw),
    }
    out: Inputs = {}
    for k in case.inputs:
        t = make[k]()
        out[k] = t.to(dtype).requires_grad_(k in case.grads) if t.is_floating_point() else t
    out["num_classes"], out["dtype"] = c, dtype
    return out


def input_bytes(inputs: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def make_input_sets(case: OpCase, shape: Shape, dtype: torch.dtype, device: torch.device) -> List[Inputs]:
    """The input sets timed calls rotate over: together at least twice the last-level cache (``timing.num_copies``)."""
    from .timing import num_copies

    first = make_inputs(case, shape, dtype, device, 0)
    return [first] + [make_inputs(case, shape, dtype, device, s)
                      for s in range(1, num_copies(input_bytes(first), device))]


def forward_backward(case: OpCase, fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], tuple]:
    """``fn`` followed by the gradients of its output w.r.t. the case's differentiable inputs."""
    def run(i: Inputs) -> tuple:
        out = fn(i)
        wrt = [i[k] for k in case.grads]
        if out.dim() == 0:
            return torch.autograd.grad(out, wrt)
        return torch.autograd.grad(out, wrt, grad_outputs=i["gout"])

    return run


def impl_function(case: OpCase, impl: str) -> Callable[[Inputs], torch.Tensor]:
    """The forward of one implementation. ``compile`` returns a fresh ``torch.compile`` wrapper: compile once per
    case (shape and dtype fixed), and reset dynamo between cases (``timing.fresh_compile``)."""
    if impl == "eager":
        return case.eager
    if impl == "compile":
        return torch.compile(case.eager, dynamic=False)
    return lambda i: case.fused(i, impl)


def fused_backends(device: torch.device, shape: Shape, include_triton_cpu: bool = False) -> List[str]:
    """The fastadvseg backends to time on ``device`` for ``shape``: every name ``available_backends`` lists,
    except "triton" on CPU (the interpreter), which runs only with ``include_triton_cpu`` and only on tiny shapes."""
    names = _fas().available_backends(device)
    if device.type == "cpu" and "triton" in names and not (include_triton_cpu and shape.tiny):
        names = [n for n in names if n != "triton"]
    return names
