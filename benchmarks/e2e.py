"""End-to-end figure: images/s of one training iteration of the paper's method, fused losses vs reference losses.

One iteration (the losses of the authors' training loop; G's two terms go into one backward): G update on a
labelled batch (``generator_loss`` with targets, lambda_adv = 0.01) and an unlabelled batch (lambda_adv = 0.001,
lambda_semi = 0.1), then a D update with ``discriminator_loss`` on G's detached predictions (fake) and the one-hot
ground truth (real, ignore pixels masked). "fused" calls fastadvseg (backend auto); "reference" calls
:mod:`benchmarks.reference_ops`. Both run the same G, D and optimizers on the same device in the same process,
steps interleaved (fused, reference, fused, ...) so that a change in machine load hits both alike; the figure is
the ratio of median step times.

G and D are the project's ``fastadvseg.models`` when that package is present: ``build_segmenter(name, C)`` (default
``deeplabv2_compact`` on CPU, ``deeplabv2_resnet101``, the paper's G, on GPU; its stride-8 logits upsampled to
the input as in the authors' loop) and ``FCDiscriminator(C)``; otherwise the small stand-ins below, and the
report says so.

:func:`run_e2e_compile` (``--e2e-compile``) times the same iteration with the loss functions of
:func:`loss_functions` called as they are vs under ``torch.compile``, with fastadvseg's losses and, to tell
torch.compile's effect on G and D apart from the losses', with the reference losses; and counts the graph breaks
``torch._dynamo.explain`` finds in fastadvseg's loss functions.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import reference_ops as R
from .cases import IGNORE, LAMBDA_ADV, LAMBDA_SEMI, LAMBDA_SEMI_ADV, THRESHOLD
from .timing import summarize, sync

# (N labelled = N unlabelled, C, H, W) per device type; "tiny" for smoke tests
E2E_SIZES = {"cpu": (2, 21, 129, 129), "cuda": (10, 21, 321, 321), "tiny": (1, 5, 33, 33)}
E2E_REPEATS = {"cpu": 30, "cuda": 20, "tiny": 2}  # CPU steps are ~0.15 s: 30 per variant keep a run short
DEFAULT_SEGMENTER = {"cpu": "deeplabv2_compact", "cuda": "deeplabv2_resnet101"}
STAND_IN = "stand-in"  # --e2e-segmenter stand-in: the small G below (quick to compile, for smoke tests)


class StandInSegmenter(nn.Module):
    """STAND-IN G (not DeepLab-v2): a small dilated conv net, output stride 4, logits upsampled to the input."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, num_classes, 1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(img), size=img.shape[-2:], mode="bilinear", align_corners=True)


class StandInDiscriminator(nn.Module):
    """STAND-IN D: the paper's D (5 convs 4x4 stride 2, LeakyReLU 0.2, output upsampled), narrower (``width``)."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        chans = [num_classes, width, 2 * width, 4 * width, 8 * width]
        layers = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.body = nn.Sequential(*layers, nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(p), size=p.shape[-2:], mode="bilinear", align_corners=True)


def build_models(num_classes: int, segmenter: Optional[str]) -> Tuple[nn.Module, nn.Module, str]:
    """(G, D, description). The project's models when available and asked for, else the stand-ins."""
    try:
        from fastadvseg import models
    except ImportError:
        models = None
    notes = []
    if models is not None and segmenter in getattr(models, "SEGMENTERS", ()):
        g = models.build_segmenter(segmenter, num_classes)
        notes.append(f"G = fastadvseg.models.build_segmenter({segmenter!r})")
    else:
        g = StandInSegmenter(num_classes)
        why = ("asked for" if segmenter == STAND_IN else "fastadvseg.models missing" if models is None
               else f"no segmenter {segmenter!r} in fastadvseg.models")
        notes.append(f"G = STAND-IN small conv net ({why})")
    if models is not None and hasattr(models, "FCDiscriminator"):
        d = models.FCDiscriminator(num_classes)
        notes.append("D = fastadvseg.models.FCDiscriminator")
    else:
        d = StandInDiscriminator(num_classes)
        notes.append("D = STAND-IN paper-shaped D at width 16 (fastadvseg.models missing)")
    return g, d, "; ".join(notes)


def _upsampled(net: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """``net(inp)`` at the input's resolution (the authors' ``interp`` after G; a no-op for a D that upsamples)."""
    out = net(inp)
    if out.shape[-2:] != inp.shape[-2:]:
        out = F.interpolate(out, size=inp.shape[-2:], mode="bilinear", align_corners=True)
    return out


def _loss_set(kind: str) -> Dict[str, Callable]:
    if kind == "fused":
        import fastadvseg as fas

        return {
            "softmax": fas.softmax2d,
            "gen": lambda x, z, y, la, ls: fas.generator_loss(x, z, y, lambda_adv=la, lambda_semi=ls,
                                                              threshold=THRESHOLD).total,
            "one_hot": lambda y, c: fas.one_hot2d(y, c),
            "disc": lambda f, r, m: fas.discriminator_loss(f, r, ignore_mask_real=m),
        }
    return {
        "softmax": R.softmax2d,
        "gen": lambda x, z, y, la, ls: R.generator_loss(x, z, y, la, ls, THRESHOLD),
        "one_hot": lambda y, c: R.one_hot2d(y, c),
        "disc": lambda f, r, m: R.discriminator_loss(f, r, m),
    }


def _setup(device: torch.device, n: int, num_classes: int, h: int, w: int, segmenter: Optional[str], seed: int):
    """G, D and their optimizers (the paper's settings) and one batch (labelled images, labels, unlabelled images),
    seeded: what every timed training step starts from."""
    torch.manual_seed(seed)
    segmenter = segmenter or DEFAULT_SEGMENTER.get(device.type)
    g, d, models_note = build_models(num_classes, segmenter)
    g, d = g.to(device).train(), d.to(device).train()
    opt_g = torch.optim.SGD(g.parameters(), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99))
    y = torch.randint(0, num_classes, (n, h, w))
    y[torch.rand(n, h, w) < 0.05] = IGNORE
    batch = (torch.randn(n, 3, h, w, device=device), y.to(device), torch.randn(n, 3, h, w, device=device))
    return g, d, opt_g, opt_d, batch, models_note


def run_e2e(device: torch.device, n: int, num_classes: int, h: int, w: int, *, segmenter: Optional[str] = None,
            warmup: int = 2, repeats: int = 10, seed: int = 0) -> dict:
    g, d, opt_g, opt_d, batch, models_note = _setup(device, n, num_classes, h, w, segmenter, seed)
    kinds = ("fused", "reference")
    losses = {k: loss_functions(k) for k in kinds}
    samples = {k: [] for k in kinds}
    for step in range(warmup + repeats):
        for k in kinds:  # interleaved: load drift hits both
            sync(device)
            t0 = time.perf_counter()
            training_step(g, d, opt_g, opt_d, batch, *losses[k], num_classes)
            sync(device)
            if step >= warmup:
                samples[k].append(time.perf_counter() - t0)
    stats = {k: summarize(v) for k, v in samples.items()}
    images = 2 * n  # labelled + unlabelled batch per iteration
    result = {"shape": f"N={n}+{n}, C={num_classes}, {h}x{w}", "dtype": "float32", "models": models_note,
              "images_per_iter": images, "fused_backend": "auto"}
    try:
        import fastadvseg

        result["fused_backend"] = "auto -> " + ",".join(fastadvseg.available_backends(device)[:1])
    except Exception:  # reported as plain "auto"
        pass
    for k in kinds:
        result[k] = dict(stats[k], images_per_s=images / (stats[k]["median_ms"] / 1e3))
    result["speedup"] = stats["reference"]["median_ms"] / stats["fused"]["median_ms"]
    return result


# --- the training step of --e2e and --e2e-compile ---------------------------------------------------------------

def loss_functions(kind: str = "fused") -> Tuple[Callable, Callable]:
    """(G's loss, D's loss) of one iteration as a user writes them, with fastadvseg's losses (``"fused"``) or the
    plain PyTorch composition (``"reference"``):

    * G's loss (D frozen by the caller): D(softmax2d(logits)), ``generator_loss`` on the labelled and on the
      unlabelled batch; returns the loss and the detached logits for D's update;
    * D's loss: ``discriminator_loss`` on D(softmax2d(detached logits)) and D(one_hot2d(target)).
    """
    losses = _loss_set(kind)

    def generator_losses(g, d, img_l, y, img_u):
        pred = _upsampled(g, img_l)
        loss = losses["gen"](pred, _upsampled(d, losses["softmax"](pred)), y, LAMBDA_ADV, 0.0)
        pred_u = _upsampled(g, img_u)
        loss = loss + losses["gen"](pred_u, _upsampled(d, losses["softmax"](pred_u)), None, LAMBDA_SEMI_ADV,
                                    LAMBDA_SEMI)
        return loss, pred.detach(), pred_u.detach()

    def discriminator_losses(d, pred, pred_u, y, num_classes: int):
        fake = _upsampled(d, losses["softmax"](torch.cat([pred, pred_u])))
        real = _upsampled(d, losses["one_hot"](y, num_classes))
        return losses["disc"](fake, real, y == IGNORE)

    return generator_losses, discriminator_losses


def training_step(g, d, opt_g, opt_d, batch, gen_fn, disc_fn, num_classes: int) -> None:
    """One iteration, for ``--e2e`` and ``--e2e-compile`` alike: ``gen_fn``/``disc_fn`` (from
    :func:`loss_functions`, plain or ``torch.compile``d) give the losses, ``.backward()`` and the optimizer steps run
    outside them (under torch.compile, AOTAutograd compiles the backward with the forward)."""
    img_l, y, img_u = batch
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    d.requires_grad_(False)
    loss_g, pred, pred_u = gen_fn(g, d, img_l, y, img_u)
    loss_g.backward()
    opt_g.step()
    d.requires_grad_(True)
    disc_fn(d, pred, pred_u, y, num_classes).backward()
    opt_d.step()


def graph_breaks(g, d, batch, num_classes: int) -> dict:
    """Graph breaks ``torch._dynamo.explain`` finds in the two loss functions (0 when each traces as one graph)."""
    img_l, y, img_u = batch
    generator_losses, discriminator_losses = loss_functions("fused")
    try:
        d.requires_grad_(False)
        gen = torch._dynamo.explain(generator_losses)(g, d, img_l, y, img_u)
        _, pred, pred_u = generator_losses(g, d, img_l, y, img_u)
        d.requires_grad_(True)
        disc = torch._dynamo.explain(discriminator_losses)(d, pred, pred_u, y, num_classes)
    except Exception as exc:  # reported, not fatal
        return {"graph_breaks": None, "break_reasons": [], "explain_status": f"{type(exc).__name__}: {exc}"[:200]}
    finally:
        d.requires_grad_(True)
        torch._dynamo.reset()
    reasons = []
    for r in list(gen.break_reasons) + list(disc.break_reasons):
        text = str(getattr(r, "reason", r)).splitlines()[0][:160]
        if text not in reasons:
            reasons.append(text)
    return {"graph_breaks": gen.graph_break_count + disc.graph_break_count,
            "graphs": gen.graph_count + disc.graph_count, "break_reasons": reasons[:5], "explain_status": "ok"}


# The timed variants of the compiled step: (loss functions, compiled?). The two "reference" variants are the same
# step with the plain PyTorch losses: they tell how much of a difference between compiled and eager is
# torch.compile's on G and D on this machine rather than the losses'.
COMPILE_VARIANTS = {"eager": ("fused", False), "compiled": ("fused", True),
                    "reference_eager": ("reference", False), "reference_compiled": ("reference", True)}


def run_e2e_compile(device: torch.device, n: int, num_classes: int, h: int, w: int, *,
                    segmenter: Optional[str] = None, warmup: int = 2, repeats: int = 10, seed: int = 0) -> dict:
    """Median step time of :func:`training_step` with the loss functions eager vs ``torch.compile``d, with
    fastadvseg's losses and with the reference losses (:data:`COMPILE_VARIANTS`); same G, D, optimizers and batch,
    steps interleaved with the order alternating; ratios of medians."""
    from .timing import ratio_range, too_noisy

    g, d, opt_g, opt_d, batch, models_note = _setup(device, n, num_classes, h, w, segmenter, seed)
    result = {"shape": f"N={n}+{n}, C={num_classes}, {h}x{w}", "dtype": "float32", "models": models_note,
              "losses": "fastadvseg (backend auto); reference: the plain PyTorch composition",
              "compile": "torch.compile(default mode) of the two loss functions"}
    result.update(graph_breaks(g, d, batch, num_classes))
    torch._dynamo.reset()
    fns = {}
    for name, (kind, compiled) in COMPILE_VARIANTS.items():
        pair = loss_functions(kind)
        fns[name] = tuple(torch.compile(f) for f in pair) if compiled else pair
    for name in ("compiled", "reference_compiled"):
        sync(device)
        t0 = time.perf_counter()
        training_step(g, d, opt_g, opt_d, batch, *fns[name], num_classes)  # compiles forward and backward
        sync(device)
        result[f"first_{name}_step_s"] = time.perf_counter() - t0
    samples = {k: [] for k in fns}
    for step in range(warmup + repeats):
        for k in (list(fns) if step % 2 == 0 else list(fns)[::-1]):  # interleaved, order alternating
            sync(device)
            t0 = time.perf_counter()
            training_step(g, d, opt_g, opt_d, batch, *fns[k], num_classes)
            sync(device)
            if step >= warmup:
                samples[k].append(time.perf_counter() - t0)
    for k in fns:
        result[k] = summarize(samples[k])
    for name, num, den in (("compiled_vs_eager", "compiled", "eager"),
                           ("reference_compiled_vs_eager", "reference_compiled", "reference_eager"),
                           ("compiled_vs_reference_compiled", "compiled", "reference_compiled")):
        result[name] = result[num]["median_ms"] / result[den]["median_ms"]
        result[f"{name}_range"] = ratio_range(result[num], result[den])
    result["too_noisy"] = too_noisy(result["compiled"], result["eager"], 1.0)
    return result
