"""One training iteration of Hung et al. (2018): a generator (segmenter) update, then a discriminator update; and
of the two controls that learn from the unlabelled images without the discriminator's judgement.

G step: labelled batch -> ``generator_loss(logits, D(softmax(logits)), target)`` = L_ce + lambda_adv L_adv
(``baseline`` and ``mean_teacher``: plain L_ce). Unlabelled batch, one function per mode, each the whole loss of that
mode in one place:

- ``semi`` (:func:`semi_loss`): lambda_semi_adv L_adv + lambda_semi L_semi, L_semi on the argmax pseudo-labels where
  sigmoid(D) > semi_threshold;
- ``selftrain`` (:func:`selftrain_loss`): the same, but L_semi keeps the pixels where G's own max softmax >=
  selftrain_threshold. L_adv stays as in ``semi``, so that the two differ in the mask alone;
- ``mean_teacher`` (:func:`cutmix_mean_teacher_loss`): lambda_cutmix CE of the student on CutMix blends of two
  unlabelled crops (:func:`cutmix_boxes`, :func:`cutmix`) against the argmax of the EMA teacher's logits on the
  unmixed crops, blended with the same box, kept where the teacher's confidence >= teacher_threshold. After G's step the teacher
  moves towards the student (``builders.update_teacher``).

With ``fused_upsampling`` (the default) G's 1/8-resolution logits and D's own low-resolution map go into the
losses, which upsample them to the labels' size inside their kernels (bilinear, align_corners=True, as the authors'
``F.interpolate``): :func:`builders.predict` and :func:`builders.upsampling` say which.

The pseudo-label terms start at ``semi_start``. D takes no gradient from these (requires_grad off, as the authors
do). D step (``adv``, ``semi``, ``selftrain``): fake = D(softmax of the detached predictions), real = D(one-hot ground
truth), ignored pixels excluded, the sum halved as in the paper.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

import fastadvseg as _fas

from ..config import ADVERSARIAL_MODES, UNLABELLED_MODES, TrainConfig
from .builders import at_size, autocast, d_input, predict, segment, update_teacher, upsampling
from .sampling import derive_seed


@dataclass
class Nets:
    G: torch.nn.Module  # possibly DDP-wrapped
    D: torch.nn.Module  # possibly DDP-wrapped (used for the D step)
    D_raw: torch.nn.Module  # the bare D: used inside the G step, where it takes no gradient
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: Optional[object] = None
    scaler_d: Optional[object] = None
    teacher: Optional[torch.nn.Module] = None  # mean_teacher mode: the EMA of the bare G (builders.build_teacher)


@dataclass
class UnlabelledLoss:
    """What the unlabelled batch adds to G's loss: ``total`` (to backpropagate) and the terms logged by name."""
    total: torch.Tensor
    logged: Dict[str, torch.Tensor] = field(default_factory=dict)


def semi_loss(fas, cfg: TrainConfig, logits_u, d_logits_u, *, semi_on: bool, backend: str,
              up: dict) -> UnlabelledLoss:
    """The paper's unlabelled loss: lambda_semi_adv L_adv + lambda_semi L_semi (D chooses L_semi's pixels).
    ``up``: the losses' upsampling arguments (:func:`builders.upsampling`)."""
    u = fas.generator_loss(logits_u, d_logits_u, None, lambda_adv=cfg.lambda_semi_adv,
                           lambda_semi=cfg.lambda_semi if semi_on else 0.0, threshold=cfg.semi_threshold,
                           ignore_index=cfg.ignore_index, backend=backend, **up)
    logged = {"loss_semi_adv": u.adv}
    if semi_on:  # before semi_start L_semi is off: nothing is kept
        logged.update(loss_semi=u.semi, semi_ratio=u.semi_ratio)
    return UnlabelledLoss(u.total, logged)


def selftrain_loss(fas, cfg: TrainConfig, logits_u, d_logits_u, *, semi_on: bool, backend: str,
                   up: dict) -> UnlabelledLoss:
    """``semi_loss`` with L_semi's pixels chosen by G's confidence instead of D's: lambda_semi_adv L_adv + lambda_semi
    CE(logits_u, argmax where max softmax >= selftrain_threshold), the mean over the kept pixels (one fused
    ``pseudo_label_cross_entropy2d``, the student its own teacher)."""
    u = fas.generator_loss(logits_u, d_logits_u, None, lambda_adv=cfg.lambda_semi_adv, lambda_semi=0.0,
                           ignore_index=cfg.ignore_index, backend=backend, **up)
    logged = {"loss_semi_adv": u.adv}
    if not semi_on:
        return UnlabelledLoss(u.total, logged)
    semi, ratio = fas.pseudo_label_cross_entropy2d(logits_u, None, confidence_threshold=cfg.selftrain_threshold,
                                                   return_ratio=True, backend=backend, **up)
    logged.update(loss_semi=semi, semi_ratio=ratio)
    return UnlabelledLoss(u.total + cfg.lambda_semi * semi, logged)


def cutmix_mean_teacher_loss(fas, cfg: TrainConfig, logits_mixed, teacher_logits_mixed, *, backend: str,
                             up: dict) -> UnlabelledLoss:
    """lambda_cutmix CE(the student's logits on the blends, the argmax of the teacher's blended logits where its
    confidence >= teacher_threshold), the mean over the kept pixels (one fused ``pseudo_label_cross_entropy2d``)."""
    loss, ratio = fas.pseudo_label_cross_entropy2d(logits_mixed, teacher_logits_mixed,
                                                   confidence_threshold=cfg.teacher_threshold, return_ratio=True,
                                                   backend=backend, **up)
    return UnlabelledLoss(cfg.lambda_cutmix * loss, {"loss_cutmix": loss, "semi_ratio": ratio})


CUTMIX_AREA = 0.5  # French et al.'s box: half of the crop, a random aspect ratio, inside the crop


def cutmix_boxes(n: int, size: Tuple[int, int], generator: torch.Generator, area: float = CUTMIX_AREA) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, height, width), one per pair: covering ``area`` of an (H, W) crop (up to
    rounding), the height a fraction area^u (u uniform in [0, 1]) of H so the aspect ratio varies, placed uniformly
    inside the crop."""
    H, W = size
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    h_frac = area ** u[:, 0]
    h = (h_frac * H).round().clamp(1, H).long()
    w = (area / h_frac * W).round().clamp(1, W).long()
    top = (u[:, 1] * (H - h + 1)).floor().long()
    left = (u[:, 2] * (W - w + 1)).floor().long()
    return torch.stack([top, left, h, w], 1)


def box_masks(boxes: torch.Tensor, size: Tuple[int, int], device=None) -> torch.Tensor:
    """(n, H, W) bool, True inside each box."""
    H, W = size
    boxes = boxes.to(device)
    ys = torch.arange(H, device=device).view(1, H, 1)
    xs = torch.arange(W, device=device).view(1, 1, W)
    top, left, h, w = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    return (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)


def cutmix(x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Item i of the batch ``x`` (N, ...) with, inside its box (``inside``: (N, H, W) bool), item i - 1 (item N - 1
    for item 0): each crop is paired with its neighbour, so N crops make N blends. Images (N, C, H, W), label maps
    and confidence maps (N, H, W) are blended alike."""
    mask = inside if x.dim() == inside.dim() else inside.unsqueeze(1)
    return torch.where(mask, x.roll(1, 0), x)


def _cutmix_generator(cfg: TrainConfig, step: int) -> torch.Generator:
    """The boxes of a step come from (seed, step, rank) alone: a resumed run draws the same ones."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    return torch.Generator().manual_seed(derive_seed(cfg.seed, "cutmix", step, rank))


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of all of ``module``'s gradients (0-dim tensor, no sync); the loop stops on a non-finite one."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def _step(opt, scaler) -> None:
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def train_step(cfg: TrainConfig, nets: Nets, step: int, images, labels, images_u=None, *, num_classes: int,
               losses=None) -> Dict[str, torch.Tensor]:
    """Run one iteration on device tensors; returns detached 0-dim tensors: the losses, the kept fraction of L_semi
    and the gradient norms of G and D (the loop checks that they are finite).

    ``num_classes``: the dataset's class count (the width of D's one-hot real input); pixels labelled
    ``cfg.ignore_index`` count in no loss. ``losses``: where the loss functions come from (default: the
    ``fastadvseg`` module); any object with fastadvseg's ``softmax2d``, ``generator_loss``, ``cross_entropy2d``,
    ``one_hot2d`` and ``discriminator_loss`` signatures (and ``pseudo_label_cross_entropy2d`` for the
    ``selftrain`` and ``mean_teacher`` modes). The benchmarks pass other implementations
    (benchmarks/train_step.py) to time this very step."""
    fas = _fas if losses is None else losses
    device = images.device
    ignore = cfg.ignore_index
    adversarial = cfg.mode in ADVERSARIAL_MODES
    semi_on = step >= cfg.semi_start
    use_unl = cfg.mode in UNLABELLED_MODES and images_u is not None
    # mean_teacher uses the unlabelled batch only from semi_start on (it has no L_adv term before)
    unl_backward = use_unl and (cfg.mode != "mean_teacher" or semi_on)
    if cfg.mode == "mean_teacher" and nets.teacher is None:
        raise ValueError("train_step: mode mean_teacher needs nets.teacher (fastadvseg.utils.builders.build_teacher)")
    be = cfg.loss_backend
    out: Dict[str, torch.Tensor] = {}
    size = tuple(labels.shape[-2:])
    up = upsampling(cfg, size)  # G's logits and D's map go into the losses at their own resolution

    # ---- G step ----
    nets.opt_g.zero_grad(set_to_none=True)
    nets.D_raw.requires_grad_(False)
    # With an unlabelled pass, let DDP reduce the gradients once, after both backward passes.
    no_sync = nets.G.no_sync() if unl_backward and hasattr(nets.G, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with autocast(cfg, device):
            logits = predict(cfg, nets.G, images, size)
            if adversarial:
                d_logits = nets.D_raw(d_input(cfg, fas.softmax2d(logits, backend=be, **up), images))
                g = fas.generator_loss(logits, d_logits, labels, lambda_adv=cfg.lambda_adv, ignore_index=ignore,
                                       backend=be, **up)
                loss, out["loss_ce"], out["loss_adv"] = g.total, g.ce, g.adv
            else:
                loss = out["loss_ce"] = fas.cross_entropy2d(logits, labels, ignore_index=ignore, backend=be, **up)
        _backward(loss, nets.scaler_g)
    if unl_backward:
        with autocast(cfg, device):
            if cfg.mode == "mean_teacher":
                if tuple(images_u.shape[-2:]) != size:
                    raise ValueError(f"train_step: unlabelled crops {tuple(images_u.shape[-2:])} differ from the "
                                     f"labelled crops {size}; CutMix blends label maps of the crop size")
                with torch.no_grad():  # the teacher predicts on the unmixed crops, at the labels' size
                    teacher_logits = segment(nets.teacher, images_u, size)
                inside = box_masks(cutmix_boxes(len(images_u), size, _cutmix_generator(cfg, step)), size, device)
                logits_mixed = predict(cfg, nets.G, cutmix(images_u, inside), size)
                u = cutmix_mean_teacher_loss(fas, cfg, logits_mixed, cutmix(teacher_logits, inside), backend=be,
                                             up=up)
            else:
                logits_u = predict(cfg, nets.G, images_u, size)
                d_logits_u = nets.D_raw(d_input(cfg, fas.softmax2d(logits_u, backend=be, **up), images_u))
                unlabelled_loss = semi_loss if cfg.mode == "semi" else selftrain_loss
                u = unlabelled_loss(fas, cfg, logits_u, d_logits_u, semi_on=semi_on, backend=be, up=up)
        _backward(u.total, nets.scaler_g)
        out.update(u.logged)
    if nets.scaler_g is None:  # (a GradScaler expects inf gradients now and then, and skips those steps itself)
        out["grad_norm_g"] = grad_norm(nets.G)
    _step(nets.opt_g, nets.scaler_g)
    if nets.teacher is not None:
        update_teacher(nets.teacher, getattr(nets.G, "module", nets.G), cfg.teacher_decay)
    nets.D_raw.requires_grad_(True)
    if not adversarial:
        return {k: v.detach() for k, v in out.items()}

    # ---- D step: one forward over [fake labelled, fake unlabelled, real] ----
    nets.opt_d.zero_grad(set_to_none=True)
    fake = logits.detach()
    fake_images = images
    fake_ignore = labels == ignore
    if use_unl and cfg.d_unlabelled:
        fake = torch.cat([fake, logits_u.detach()])
        fake_images = torch.cat([images, images_u])
        fake_ignore = torch.cat([fake_ignore, torch.zeros_like(fake_ignore[: len(logits_u)])])
    with autocast(cfg, device):
        p_fake = fas.softmax2d(fake, backend=be, **up)
        real = fas.one_hot2d(labels, num_classes, ignore_index=ignore, dtype=p_fake.dtype, backend=be)
        if cfg.d_real_smoothing:  # ignored pixels stay zero vectors (excluded from the loss anyway)
            eps = cfg.d_real_smoothing
            real = real * (1 - eps) + (eps / num_classes) * (labels != ignore).unsqueeze(1).to(real.dtype)
        d_in = torch.cat([d_input(cfg, p_fake, fake_images), d_input(cfg, real, images)])
        d_out = nets.D(d_in.contiguous(memory_format=_fmt(cfg)))
        d_fake, d_real = d_out[: len(fake)], d_out[len(fake):]
        loss_d = fas.discriminator_loss(d_fake, d_real, ignore_mask_fake=fake_ignore.unsqueeze(1),
                                        ignore_mask_real=(labels == ignore).unsqueeze(1), backend=be, **up) / 2
    _backward(loss_d, nets.scaler_d)
    out["loss_d"] = loss_d
    with torch.no_grad():  # D's mean confidence sigmoid(D) on the predictions (fake) and on the ground truth (real)
        d_fake, d_real = at_size(d_fake.float(), size), at_size(d_real.float(), size)
        out["d_conf_fake"] = _masked_mean(torch.sigmoid(d_fake), ~fake_ignore.unsqueeze(1))
        out["d_conf_real"] = _masked_mean(torch.sigmoid(d_real), (labels != ignore).unsqueeze(1))
    if nets.scaler_d is None:
        out["grad_norm_d"] = grad_norm(nets.D)
    _step(nets.opt_d, nets.scaler_d)
    return {k: v.detach() for k, v in out.items()}


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(x.dtype)
    return (x * keep).sum() / keep.sum().clamp_min(1.0)


def _fmt(cfg: TrainConfig):
    return torch.channels_last if cfg.channels_last else torch.contiguous_format
