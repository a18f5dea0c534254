"""One training iteration of Hung et al. (2018): a generator (segmenter) update, then a discriminator update.

G step: labelled batch -> ``generator_loss(logits, D(softmax(logits)), target)`` = L_ce + lambda_adv L_adv
(``baseline``: plain L_ce); in ``semi`` mode also the unlabelled batch -> lambda_semi_adv L_adv +
lambda_semi L_semi (L_semi from ``semi_start`` on). D takes no gradient from these (requires_grad off, as the
authors do). D step: fake = D(softmax of the detached predictions), real = D(one-hot ground truth), ignored
pixels excluded, the sum halved as in the paper.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import fastadvseg as _fas

from ..config import TrainConfig
from .builders import autocast, d_input, segment


@dataclass
class Nets:
    G: torch.nn.Module  # possibly DDP-wrapped
    D: torch.nn.Module  # possibly DDP-wrapped (used for the D step)
    D_raw: torch.nn.Module  # the bare D: used inside the G step, where it takes no gradient
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: Optional[object] = None
    scaler_d: Optional[object] = None


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
    ``one_hot2d`` and ``discriminator_loss`` signatures. The benchmarks pass other implementations
    (benchmarks/train_step.py) to time this very step."""
    fas = _fas if losses is None else losses
    device = images.device
    ignore = cfg.ignore_index
    adversarial = cfg.mode != "baseline"
    use_unl = cfg.mode == "semi" and images_u is not None
    be = cfg.loss_backend
    out: Dict[str, torch.Tensor] = {}
    size = tuple(labels.shape[-2:])

    # ---- G step ----
    nets.opt_g.zero_grad(set_to_none=True)
    nets.D_raw.requires_grad_(False)
    # With an unlabelled pass, let DDP reduce the gradients once, after both backward passes.
    no_sync = nets.G.no_sync() if use_unl and hasattr(nets.G, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with autocast(cfg, device):
            logits = segment(nets.G, images, size)
            if adversarial:
                d_logits = nets.D_raw(d_input(cfg, fas.softmax2d(logits, backend=be), images))
                g = fas.generator_loss(logits, d_logits, labels, lambda_adv=cfg.lambda_adv, ignore_index=ignore,
                                       backend=be)
                loss, out["loss_ce"], out["loss_adv"] = g.total, g.ce, g.adv
            else:
                loss = out["loss_ce"] = fas.cross_entropy2d(logits, labels, ignore_index=ignore, backend=be)
        _backward(loss, nets.scaler_g)
    if use_unl:
        lambda_semi = cfg.lambda_semi if step >= cfg.semi_start else 0.0
        with autocast(cfg, device):
            logits_u = segment(nets.G, images_u, size)
            d_logits_u = nets.D_raw(d_input(cfg, fas.softmax2d(logits_u, backend=be), images_u))
            u = fas.generator_loss(logits_u, d_logits_u, None, lambda_adv=cfg.lambda_semi_adv, lambda_semi=lambda_semi,
                                   threshold=cfg.semi_threshold, ignore_index=ignore, backend=be)
        _backward(u.total, nets.scaler_g)
        out["loss_semi_adv"] = u.adv
        if step >= cfg.semi_start:  # before semi_start L_semi is off: nothing is kept
            out["loss_semi"], out["semi_ratio"] = u.semi, u.semi_ratio
    if nets.scaler_g is None:  # (a GradScaler expects inf gradients now and then, and skips those steps itself)
        out["grad_norm_g"] = grad_norm(nets.G)
    _step(nets.opt_g, nets.scaler_g)
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
        p_fake = fas.softmax2d(fake, backend=be)
        real = fas.one_hot2d(labels, num_classes, ignore_index=ignore, dtype=p_fake.dtype, backend=be)
        if cfg.d_real_smoothing:  # ignored pixels stay zero vectors (excluded from the loss anyway)
            eps = cfg.d_real_smoothing
            real = real * (1 - eps) + (eps / num_classes) * (labels != ignore).unsqueeze(1).to(real.dtype)
        d_in = torch.cat([d_input(cfg, p_fake, fake_images), d_input(cfg, real, images)])
        d_out = nets.D(d_in.contiguous(memory_format=_fmt(cfg)))
        d_fake, d_real = d_out[: len(fake)], d_out[len(fake):]
        loss_d = fas.discriminator_loss(d_fake, d_real, ignore_mask_fake=fake_ignore.unsqueeze(1),
                                        ignore_mask_real=(labels == ignore).unsqueeze(1), backend=be) / 2
    _backward(loss_d, nets.scaler_d)
    out["loss_d"] = loss_d
    with torch.no_grad():  # D's mean confidence sigmoid(D) on the predictions (fake) and on the ground truth (real)
        out["d_conf_fake"] = _masked_mean(torch.sigmoid(d_fake.float()), ~fake_ignore.unsqueeze(1))
        out["d_conf_real"] = _masked_mean(torch.sigmoid(d_real.float()), (labels != ignore).unsqueeze(1))
    if nets.scaler_d is None:
        out["grad_norm_d"] = grad_norm(nets.D)
    _step(nets.opt_d, nets.scaler_d)
    return {k: v.detach() for k, v in out.items()}


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(x.dtype)
    return (x * keep).sum() / keep.sum().clamp_min(1.0)


def _fmt(cfg: TrainConfig):
    return torch.channels_last if cfg.channels_last else torch.contiguous_format
