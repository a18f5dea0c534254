"""Benchmark cases: for every public op, its inputs, its implementations (``eager``: benchmarks/reference_ops.py,
``compile``: that under ``torch.compile``, and every fastadvseg backend) and the bytes it must move. ``fwd`` is the
training forward (inputs require grad), ``fwdbwd`` adds ``torch.autograd.grad`` w.r.t. every differentiable input.

Inputs at another resolution than the labels: the names in ``OpCase.low_res`` are drawn at 1/``scale`` of the
shape's H x W (rounded up, as a stride-``scale`` network gives them), labels, masks and ``gout`` at H x W, and
``inputs["size"]`` is (H, W). A case of the loss path as users call it upsamples there, e.g.
``eager=lambda i: R.cross_entropy2d(R.upsample(i["x"], i["size"]), i["y"])`` with ``scale=8, low_res=("x",)``.

Byte model (benchmarks/README.md): ``fwd_bytes`` and ``bwd_bytes`` take P = N*H*W label pixels, C, e (the logits'
element size) and Q (the pixels of the ``low_res`` inputs; P without them); the kernels' "Bytes moved" notes
(fastadvseg/kernels/) state the same counts, minus their per-block partial sums.
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

Inputs = Dict[str, object]  # tensors by name, plus "num_classes", "dtype" (the logits') and "size" (the labels' H, W)


@dataclass(frozen=True)
class OpCase:
    name: str  # row name in the report
    api: str  # fastadvseg function it exercises
    inputs: Tuple[str, ...]  # which of x, y, z, z_real, m_real, gout it reads
    grads: Tuple[str, ...]  # differentiable inputs; empty: forward only
    eager: Callable[[Inputs], torch.Tensor]
    fused: Callable[[Inputs, str], torch.Tensor]
    byte_model: str  # the formula, as printed in the report
    fwd_bytes: Callable[[int, int, int, int], int]  # (P, C, e, Q) -> bytes
    bwd_bytes: Callable[[int, int, int, int], int] = field(default=lambda p, c, e, q: 0)  # extra bytes for fwdbwd
    scale: int = 1  # the low_res inputs are at 1/scale of the labels' H and W
    low_res: Tuple[str, ...] = ()

    @property
    def directions(self) -> Tuple[str, ...]:
        return ("fwd", "fwdbwd") if self.grads else ("fwd",)

    @property
    def has_backward(self) -> bool:
        return bool(self.grads)

    def low_size(self, h: int, w: int) -> Tuple[int, int]:
        return -(-h // self.scale), -(-w // self.scale)

    def bytes(self, shape: Shape, dtype: torch.dtype, direction: str) -> int:
        p, c, e = shape.pixels, shape.c, torch.empty((), dtype=dtype).element_size()
        hl, wl = self.low_size(shape.h, shape.w)
        q = shape.n * hl * wl if self.low_res else p
        total = self.fwd_bytes(p, c, e, q)
        return total + self.bwd_bytes(p, c, e, q) if direction == "fwdbwd" else total


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
           fwd_bytes=lambda p, c, e, q: 2 * p * c * e, bwd_bytes=lambda p, c, e, q: 3 * p * c * e),
    OpCase("cross_entropy2d", "cross_entropy2d", ("x", "y"), ("x",),
           eager=lambda i: R.cross_entropy2d(i["x"], i["y"]),
           fused=lambda i, b: _fas().cross_entropy2d(i["x"], i["y"], backend=b),
           byte_model="fwd: read x, y (PCe + 8P); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e, q: p * c * e + 8 * p, bwd_bytes=lambda p, c, e, q: p * c * e),
    OpCase("bce_with_logits2d", "bce_with_logits2d", ("z", "m_real"), ("z",),
           eager=lambda i: R.bce_with_logits2d(i["z"], 1.0, i["m_real"]),
           fused=lambda i, b: _fas().bce_with_logits2d(i["z"], 1.0, ignore_mask=i["m_real"], backend=b),
           byte_model="fwd: read z, mask (Pe + P); +bwd: write dz (+Pe)",
           fwd_bytes=lambda p, c, e, q: p * e + p, bwd_bytes=lambda p, c, e, q: p * e),
    OpCase("semi_cross_entropy2d", "semi_cross_entropy2d", ("x", "z"), ("x",),
           eager=lambda i: R.semi_cross_entropy2d(i["x"], i["z"], THRESHOLD),
           fused=lambda i, b: _fas().semi_cross_entropy2d(i["x"], i["z"], threshold=THRESHOLD, backend=b),
           byte_model="fwd: read x, z (PCe + Pe); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e, q: p * c * e + p * e, bwd_bytes=lambda p, c, e, q: p * c * e),
    OpCase("one_hot2d", "one_hot2d", ("y",), (),
           eager=lambda i: R.one_hot2d(i["y"], i["num_classes"], dtype=i["dtype"]),
           fused=lambda i, b: _fas().one_hot2d(i["y"], i["num_classes"], dtype=i["dtype"], backend=b),
           byte_model="fwd: read y, write one-hot (8P + PCe)",
           fwd_bytes=lambda p, c, e, q: 8 * p + p * c * e),
    OpCase("generator_loss[labelled]", "generator_loss", ("x", "y", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(i["x"], i["z"], i["y"], LAMBDA_ADV),
           fused=_gen_labelled,
           byte_model="fwd: read x, y, z (PCe + 8P + Pe); +bwd: write dx, dz (+PCe + Pe)",
           fwd_bytes=lambda p, c, e, q: p * c * e + 8 * p + p * e, bwd_bytes=lambda p, c, e, q: p * c * e + p * e),
    OpCase("generator_loss[unlabelled]", "generator_loss", ("x", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(i["x"], i["z"], None, LAMBDA_SEMI_ADV, LAMBDA_SEMI, THRESHOLD),
           fused=_gen_unlabelled,
           byte_model="fwd: read x, z (PCe + Pe); +bwd: write dx, dz (+PCe + Pe)",
           fwd_bytes=lambda p, c, e, q: p * c * e + p * e, bwd_bytes=lambda p, c, e, q: p * c * e + p * e),
    OpCase("discriminator_loss", "discriminator_loss", ("z", "z_real", "m_real"), ("z", "z_real"),
           eager=lambda i: R.discriminator_loss(i["z"], i["z_real"], i["m_real"]),
           fused=lambda i, b: _fas().discriminator_loss(i["z"], i["z_real"], ignore_mask_real=i["m_real"], backend=b),
           byte_model="fwd: read d_fake, d_real, real mask (2Pe + P); +bwd: write both grads (+2Pe)",
           fwd_bytes=lambda p, c, e, q: 2 * p * e + p, bwd_bytes=lambda p, c, e, q: 2 * p * e),
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
        "x": lambda hw: torch.randn(n, c, *hw, **kw) * 2,
        "y": lambda hw: y,
        "z": lambda hw: torch.randn(n, 1, *hw, **kw) + 1,
        "z_real": lambda hw: torch.randn(n, 1, *hw, **kw) + 1,
        "m_real": lambda hw: y == IGNORE,
        "gout": lambda hw: torch.randn(n, c, *hw, **kw),
    }
    out: Inputs = {}
    for k in case.inputs:
        t = make[k](case.low_size(h, w) if k in case.low_res else (h, w))
        out[k] = t.to(dtype).requires_grad_(k in case.grads) if t.is_floating_point() else t
    out["num_classes"], out["dtype"], out["size"] = c, dtype, (h, w)
    return out


def make_input_sets(case: OpCase, shape: Shape, dtype: torch.dtype, device: torch.device) -> List[Inputs]:
    """The input sets timed calls rotate over: together at least twice the last-level cache (``timing.num_copies``)."""
    from .timing import num_copies

    first = make_inputs(case, shape, dtype, device, 0)
    nbytes = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
    return [first] + [make_inputs(case, shape, dtype, device, s) for s in range(1, num_copies(nbytes, device))]


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
    case (shape and dtype fixed), and reset dynamo between cases."""
    if impl == "eager":
        return case.eager
    if impl == "compile":
        return torch.compile(case.eager, dynamic=False)
    return lambda i: case.fused(i, impl)


def fused_backends(device: torch.device, shape: Shape, include_triton_cpu: bool = False,
                   only: Optional[Sequence[str]] = None) -> List[str]:
    """The fastadvseg backends to time on ``device`` for ``shape``: every name ``available_backends`` lists (of
    ``only``, when given), except "triton" on CPU (the interpreter), which runs only with ``include_triton_cpu``
    and only on tiny shapes."""
    names = [n for n in _fas().available_backends(device) if only is None or n in only]
    if device.type == "cpu" and "triton" in names and not (include_triton_cpu and shape.tiny):
        names.remove("triton")
    return names
