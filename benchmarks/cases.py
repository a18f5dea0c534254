"""Benchmark cases: for every public op, its inputs, its implementations (``eager``: benchmarks/reference_ops.py,
``compile``: that under ``torch.compile``, and every fastadvseg backend) and the bytes it must move. ``fwd`` is the
training forward (inputs require grad), ``fwdbwd`` adds ``torch.autograd.grad`` w.r.t. every differentiable input.

Inputs at another resolution than the labels: the names in ``OpCase.low_res`` are drawn at 1/``scale`` of the
shape's H x W (D maps, ``z``, at 1/``d_scale`` when it is set; rounded up, as a strided network gives them), labels,
masks and ``gout`` at H x W, and ``inputs["size"]`` is (H, W). The rows of the loss path as users call it
(:data:`UPSAMPLED_CASES`, ``--ops upsampled``) take the segmentation net's logits at 1/8 and D's map at 1/32 and
upsample them there with ``align_corners=True`` (the authors' choice): ``eager`` is ``F.interpolate`` then the
loss, ``fastadvseg`` passes ``size=`` to the op, which never materialises the upsampled logits or their gradient.
``generator_path[labelled,upsampled]`` is G's loss path with D in it: the softmax at the labels' size, a stand-in
D of a few stride-2 convolutions (:class:`StandInD`, frozen, as in G's step), its map upsampled into the labelled
generator loss.

Byte model (benchmarks/README.md): ``fwd_bytes`` and ``bwd_bytes`` take P = N*H*W label pixels, C, e (the logits'
element size), Q (the pixels of the low-resolution logits; P without them) and Qd (the pixels of D's map at its own
resolution; P when it is at the labels'); the kernels' "Bytes moved" notes (fastadvseg/kernels/) state the same
counts, minus their per-block partial sums and the intermediates of a two-pass upsampling gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import reference_ops as R
from .shapes import Shape

IGNORE = R.IGNORE
LAMBDA_ADV = 0.01  # the paper's lambda_adv on a labelled batch
LAMBDA_SEMI_ADV = 0.001  # unlabelled batch
LAMBDA_SEMI = 0.1
THRESHOLD = 0.2
CONFIDENCE = 0.95  # FixMatch's / UniMatch's confidence threshold tau of the pseudo-label loss
IGNORE_FRACTION = 0.05  # VOC-like: object boundaries are labelled 255
LOGIT_SCALE = 8  # DeepLab-v2's output stride: 41x41 logits for 321x321 labels
D_SCALE = 32  # the paper's D: five stride-2 convolutions
ALIGN_CORNERS = True  # the authors' nn.Upsample(mode="bilinear", align_corners=True)
UPSAMPLED = "upsampled"  # the --ops name of every row with upsampling

Inputs = Dict[str, object]  # tensors by name, plus "num_classes", "dtype" (the logits') and "size" (the labels' H, W)
ByteCount = Callable[[int, int, int, int, int], int]  # (P, C, e, Q, Qd) -> bytes


def _no_bytes(p: int, c: int, e: int, q: int, qd: int) -> int:
    return 0


@dataclass(frozen=True)
class OpCase:
    name: str  # row name in the report
    api: str  # fastadvseg function it exercises
    inputs: Tuple[str, ...]  # which of x, x_teacher, y, z, z_real, m_real, gout, d_net (a StandInD) it reads
    grads: Tuple[str, ...]  # differentiable inputs; empty: forward only
    eager: Callable[[Inputs], torch.Tensor]
    fused: Callable[[Inputs, str], torch.Tensor]
    byte_model: str  # the formula, as printed in the report
    fwd_bytes: ByteCount
    bwd_bytes: ByteCount = _no_bytes  # extra bytes for fwdbwd
    scale: int = 1  # the low_res inputs are at 1/scale of the labels' H and W
    low_res: Tuple[str, ...] = ()
    d_scale: int = 0  # D maps (z, and d_net's output) at 1/d_scale instead; 0: as the other low_res inputs

    @property
    def directions(self) -> Tuple[str, ...]:
        return ("fwd", "fwdbwd") if self.grads else ("fwd",)

    @property
    def has_backward(self) -> bool:
        return bool(self.grads)

    @property
    def upsampled(self) -> bool:
        return bool(self.low_res or self.d_scale)

    def low_size(self, h: int, w: int, scale: Optional[int] = None) -> Tuple[int, int]:
        s = scale or self.scale
        return -(-h // s), -(-w // s)

    def input_size(self, name: str, h: int, w: int) -> Tuple[int, int]:
        """The H x W input ``name`` is drawn at."""
        if name not in self.low_res:
            return h, w
        return self.low_size(h, w, self.d_scale if name.startswith("z") else None)

    def bytes(self, shape: Shape, dtype: torch.dtype, direction: str) -> int:
        p, c, e = shape.pixels, shape.c, torch.empty((), dtype=dtype).element_size()
        q = shape.n * math.prod(self.low_size(shape.h, shape.w)) if self.low_res else p
        qd = shape.n * math.prod(self.low_size(shape.h, shape.w, self.d_scale)) if self.d_scale else q
        total = self.fwd_bytes(p, c, e, q, qd)
        return total + self.bwd_bytes(p, c, e, q, qd) if direction == "fwdbwd" else total


class StandInD(torch.nn.Module):
    """A discriminator of the paper's shape at a fraction of its cost: C -> 1 channels through 3x3 convolutions of
    stride 2 (each rounds up, so a ``2**depth``-stride map of ceil(H/32) x ceil(W/32) cells) with LeakyReLU(0.2)
    between them. Narrow on purpose: the loss path, not D, is what its rows time. Frozen, as D is in G's step."""

    def __init__(self, in_channels: int, *, depth: int = 5, width: int = 16, generator: torch.Generator,
                 device=None, dtype=None):
        super().__init__()
        chans = [in_channels] + [width] * (depth - 1) + [1]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, stride=2, padding=1, device=device, dtype=dtype)
                                         for a, b in zip(chans, chans[1:]))
        with torch.no_grad():  # seeded, so that every impl of a case sees the same D
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, device=device) * fan_in ** -0.5)
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        for k, conv in enumerate(self.convs):
            p = conv(p) if k == len(self.convs) - 1 else F.leaky_relu(conv(p), 0.2)
        return p


def _fas():
    import fastadvseg  # imported late: report.py may have to set TRITON_INTERPRET first

    return fastadvseg


def _gen_labelled(i: Inputs, b: str) -> torch.Tensor:
    return _fas().generator_loss(i["x"], i["z"], i["y"], lambda_adv=LAMBDA_ADV, backend=b).total


def _gen_unlabelled(i: Inputs, b: str) -> torch.Tensor:
    return _fas().generator_loss(i["x"], i["z"], None, lambda_adv=LAMBDA_SEMI_ADV, lambda_semi=LAMBDA_SEMI,
                                 threshold=THRESHOLD, backend=b).total


def _eager_pseudo_label(i: Inputs) -> torch.Tensor:
    """The mean-teacher loss as users write it: the teacher's max softmax and argmax, the pseudo-labels below the
    confidence threshold ignored, then F.cross_entropy (benchmark inputs always keep some pixels)."""
    with torch.no_grad():
        confidence, pseudo = torch.softmax(i["x_teacher"].float(), dim=1).max(dim=1)
        pseudo = torch.where(confidence >= CONFIDENCE, pseudo, IGNORE)
    return F.cross_entropy(i["x"], pseudo, ignore_index=IGNORE)


def _up(t: torch.Tensor, i: Inputs) -> torch.Tensor:
    return R.upsample(t, i["size"], align_corners=ALIGN_CORNERS)


def _eager_path(i: Inputs) -> torch.Tensor:
    """G's labelled loss path as a user writes it: one upsampling of the logits feeds D's softmax and the loss."""
    x = _up(i["x"], i)
    z = _up(i["d_net"](R.softmax2d(x)), i)
    return R.generator_loss(x, z, i["y"], LAMBDA_ADV)


def _fused_path(i: Inputs, b: str) -> torch.Tensor:
    fas, size = _fas(), i["size"]
    p = fas.softmax2d(i["x"], size=size, align_corners=ALIGN_CORNERS, backend=b)
    return fas.generator_loss(i["x"], i["d_net"](p), i["y"], lambda_adv=LAMBDA_ADV, size=size,
                              align_corners=ALIGN_CORNERS, backend=b).total


LABEL_RES_CASES: Tuple[OpCase, ...] = (
    OpCase("softmax2d", "softmax2d", ("x", "gout"), ("x",),
           eager=lambda i: R.softmax2d(i["x"]),
           fused=lambda i, b: _fas().softmax2d(i["x"], backend=b),
           byte_model="fwd: read x, write p (2PCe); +bwd: read p or x and dp, write dx (+3PCe)",
           fwd_bytes=lambda p, c, e, q, qd: 2 * p * c * e, bwd_bytes=lambda p, c, e, q, qd: 3 * p * c * e),
    OpCase("cross_entropy2d", "cross_entropy2d", ("x", "y"), ("x",),
           eager=lambda i: R.cross_entropy2d(i["x"], i["y"]),
           fused=lambda i, b: _fas().cross_entropy2d(i["x"], i["y"], backend=b),
           byte_model="fwd: read x, y (PCe + 8P); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e, q, qd: p * c * e + 8 * p, bwd_bytes=lambda p, c, e, q, qd: p * c * e),
    OpCase("bce_with_logits2d", "bce_with_logits2d", ("z", "m_real"), ("z",),
           eager=lambda i: R.bce_with_logits2d(i["z"], 1.0, i["m_real"]),
           fused=lambda i, b: _fas().bce_with_logits2d(i["z"], 1.0, ignore_mask=i["m_real"], backend=b),
           byte_model="fwd: read z, mask (Pe + P); +bwd: write dz (+Pe)",
           fwd_bytes=lambda p, c, e, q, qd: p * e + p, bwd_bytes=lambda p, c, e, q, qd: p * e),
    OpCase("semi_cross_entropy2d", "semi_cross_entropy2d", ("x", "z"), ("x",),
           eager=lambda i: R.semi_cross_entropy2d(i["x"], i["z"], THRESHOLD),
           fused=lambda i, b: _fas().semi_cross_entropy2d(i["x"], i["z"], threshold=THRESHOLD, backend=b),
           byte_model="fwd: read x, z (PCe + Pe); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e, q, qd: p * c * e + p * e, bwd_bytes=lambda p, c, e, q, qd: p * c * e),
    OpCase("pseudo_label_cross_entropy2d", "pseudo_label_cross_entropy2d", ("x", "x_teacher"), ("x",),
           eager=_eager_pseudo_label,
           fused=lambda i, b: _fas().pseudo_label_cross_entropy2d(i["x"], i["x_teacher"],
                                                                  confidence_threshold=CONFIDENCE, backend=b),
           byte_model="fwd: read x, teacher (2PCe); +bwd: write dx (+PCe)",
           fwd_bytes=lambda p, c, e, q, qd: 2 * p * c * e, bwd_bytes=lambda p, c, e, q, qd: p * c * e),
    OpCase("one_hot2d", "one_hot2d", ("y",), (),
           eager=lambda i: R.one_hot2d(i["y"], i["num_classes"], dtype=i["dtype"]),
           fused=lambda i, b: _fas().one_hot2d(i["y"], i["num_classes"], dtype=i["dtype"], backend=b),
           byte_model="fwd: read y, write one-hot (8P + PCe)",
           fwd_bytes=lambda p, c, e, q, qd: 8 * p + p * c * e),
    OpCase("generator_loss[labelled]", "generator_loss", ("x", "y", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(i["x"], i["z"], i["y"], LAMBDA_ADV),
           fused=_gen_labelled,
           byte_model="fwd: read x, y, z (PCe + 8P + Pe); +bwd: write dx, dz (+PCe + Pe)",
           fwd_bytes=lambda p, c, e, q, qd: p * c * e + 8 * p + p * e,
           bwd_bytes=lambda p, c, e, q, qd: p * c * e + p * e),
    OpCase("generator_loss[unlabelled]", "generator_loss", ("x", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(i["x"], i["z"], None, LAMBDA_SEMI_ADV, LAMBDA_SEMI, THRESHOLD),
           fused=_gen_unlabelled,
           byte_model="fwd: read x, z (PCe + Pe); +bwd: write dx, dz (+PCe + Pe)",
           fwd_bytes=lambda p, c, e, q, qd: p * c * e + p * e, bwd_bytes=lambda p, c, e, q, qd: p * c * e + p * e),
    OpCase("discriminator_loss", "discriminator_loss", ("z", "z_real", "m_real"), ("z", "z_real"),
           eager=lambda i: R.discriminator_loss(i["z"], i["z_real"], i["m_real"]),
           fused=lambda i, b: _fas().discriminator_loss(i["z"], i["z_real"], ignore_mask_real=i["m_real"], backend=b),
           byte_model="fwd: read d_fake, d_real, real mask (2Pe + P); +bwd: write both grads (+2Pe)",
           fwd_bytes=lambda p, c, e, q, qd: 2 * p * e + p, bwd_bytes=lambda p, c, e, q, qd: 2 * p * e),
)
# The loss path as users call it: logits at 1/8 and D's map at 1/32 of the labels, upsampled by the op. The byte
# models count what the fused op must move: the low-resolution inputs and gradients, the labels, and softmax2d's
# output, the one full-resolution tensor D needs (a two-pass gradient's intermediate, 1/8 of the full tensor, is
# not counted).
UPSAMPLED_CASES: Tuple[OpCase, ...] = (
    OpCase("softmax2d[upsampled]", "softmax2d", ("x", "gout"), ("x",),
           eager=lambda i: R.softmax2d(_up(i["x"], i)),
           fused=lambda i, b: _fas().softmax2d(i["x"], size=i["size"], align_corners=ALIGN_CORNERS, backend=b),
           byte_model="x at 1/8: fwd: read x, write p (QCe + PCe); +bwd: read p and dp, write dx (+2PCe + QCe)",
           fwd_bytes=lambda p, c, e, q, qd: q * c * e + p * c * e,
           bwd_bytes=lambda p, c, e, q, qd: 2 * p * c * e + q * c * e,
           scale=LOGIT_SCALE, low_res=("x",)),
    OpCase("cross_entropy2d[upsampled]", "cross_entropy2d", ("x", "y"), ("x",),
           eager=lambda i: R.cross_entropy2d(_up(i["x"], i), i["y"]),
           fused=lambda i, b: _fas().cross_entropy2d(i["x"], i["y"], size=i["size"], align_corners=ALIGN_CORNERS,
                                                     backend=b),
           byte_model="x at 1/8: fwd: read x, y (QCe + 8P); +bwd: write dx (+QCe)",
           fwd_bytes=lambda p, c, e, q, qd: q * c * e + 8 * p, bwd_bytes=lambda p, c, e, q, qd: q * c * e,
           scale=LOGIT_SCALE, low_res=("x",)),
    OpCase("generator_loss[labelled,upsampled]", "generator_loss", ("x", "y", "z"), ("x", "z"),
           eager=lambda i: R.generator_loss(_up(i["x"], i), _up(i["z"], i), i["y"], LAMBDA_ADV),
           fused=lambda i, b: _fas().generator_loss(i["x"], i["z"], i["y"], lambda_adv=LAMBDA_ADV, size=i["size"],
                                                    align_corners=ALIGN_CORNERS, backend=b).total,
           byte_model="x at 1/8, z at 1/32: fwd: read x, y, z (QCe + 8P + Qd e); +bwd: write dx, dz (+QCe + Qd e)",
           fwd_bytes=lambda p, c, e, q, qd: q * c * e + 8 * p + qd * e,
           bwd_bytes=lambda p, c, e, q, qd: q * c * e + qd * e,
           scale=LOGIT_SCALE, low_res=("x", "z"), d_scale=D_SCALE),
    OpCase("generator_path[labelled,upsampled]", "generator_loss", ("x", "y", "d_net"), ("x",),
           eager=_eager_path, fused=_fused_path,
           byte_model="x at 1/8, D's map at 1/32, D's convolutions not counted: fwd: read x, write p, read y and z "
                      "(QCe + PCe + 8P + Qd e); +bwd: write dx, dz, read p and dp, write dx (+2PCe + 2QCe + Qd e)",
           fwd_bytes=lambda p, c, e, q, qd: q * c * e + p * c * e + 8 * p + qd * e,
           bwd_bytes=lambda p, c, e, q, qd: 2 * p * c * e + 2 * q * c * e + qd * e,
           scale=LOGIT_SCALE, low_res=("x",), d_scale=D_SCALE),
)
CASES: Tuple[OpCase, ...] = LABEL_RES_CASES + UPSAMPLED_CASES
CASE_NAMES = tuple(c.name for c in CASES)


def select_cases(names: Optional[Sequence[str]] = None) -> List[OpCase]:
    """Cases by row name, by API name (its rows at the labels' resolution: ``generator_loss`` selects the labelled
    and the unlabelled one) or ``upsampled`` (every row of the loss path with upsampling), in :data:`CASES` order."""
    if not names:
        return list(CASES)
    chosen = [c for c in CASES if c.name in names or (c.api in names and not c.upsampled)
              or (UPSAMPLED in names and c.upsampled)]
    unknown = set(names) - {c.name for c in chosen} - {c.api for c in chosen} - {UPSAMPLED}
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(CASE_NAMES)}, an API name or "
                         f"{UPSAMPLED}")
    return chosen


def make_inputs(case: OpCase, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """One input set: random logits (never zeros), VOC-like labels with a few ignored pixels, D-logits around +1
    (sigmoid(z) > THRESHOLD for most pixels, as with a trained D, but not all), a teacher confident at CONFIDENCE on
    part of the pixels, a seeded :class:`StandInD`."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for GPU-sized inputs
    n, c, h, w = shape.n, shape.c, shape.h, shape.w
    kw = {"generator": g, "device": device}
    y = torch.randint(0, c, (n, h, w), **kw)
    y[torch.rand(n, h, w, **kw) < IGNORE_FRACTION] = IGNORE
    make = {
        "x": lambda hw: torch.randn(n, c, *hw, **kw) * 2,
        # a teacher sure of about half of the pixels at CONFIDENCE: its top logit 6 above the rest's typical ones
        "x_teacher": lambda hw: torch.randn(n, c, *hw, **kw).scatter_add_(
            1, torch.randint(0, c, (n, 1, *hw), **kw), torch.rand(n, 1, *hw, **kw) * 12),
        "y": lambda hw: y,
        "z": lambda hw: torch.randn(n, 1, *hw, **kw) + 1,
        "z_real": lambda hw: torch.randn(n, 1, *hw, **kw) + 1,
        "m_real": lambda hw: y == IGNORE,
        "gout": lambda hw: torch.randn(n, c, *hw, **kw),
    }
    out: Inputs = {}
    for k in case.inputs:
        if k == "d_net":
            depth = max(1, round(math.log2(case.d_scale or D_SCALE)))
            out[k] = StandInD(c, depth=depth, generator=g, device=device, dtype=dtype)
            continue
        t = make[k](case.input_size(k, h, w))
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
