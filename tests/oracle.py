"""Float64 ground truth for every op, written from the definitions of the paper and PyTorch's losses,
independent of the backends.

Inputs are converted to float64 *after* their own rounding (a float16 input is compared with the float64 math on
its float16 values), so the only differences a backend may show are its accumulation and output rounding.
"""
import torch


def _valid(target, c, ignore_index):
    return (target != ignore_index) & (target >= 0) & (target < c)


def _nll(x, labels):
    logp = x - torch.logsumexp(x, dim=1, keepdim=True)
    return -logp.gather(1, labels.unsqueeze(1)).squeeze(1)


def _reduce(loss_map, denom, reduction):
    if reduction == "none":
        return loss_map
    total = loss_map.sum()
    if reduction == "sum":
        return total
    return total / denom if denom > 0 else total * 0


def softmax2d(logits):
    return torch.softmax(logits.double(), dim=1)


def cross_entropy2d(logits, target, weight=None, ignore_index=255, reduction="mean"):
    x = logits.double()
    valid = _valid(target, x.shape[1], ignore_index)
    labels = torch.where(valid, target, 0)
    nll = _nll(x, labels)
    w = torch.ones_like(nll) if weight is None else weight.double()[labels]
    w = torch.where(valid, w, 0.0)
    loss_map = torch.where(valid, nll * w, 0.0)
    return _reduce(loss_map, w.sum(), reduction)


def bce(d, target, ignore_mask=None, reduction="mean"):
    z = d.double()
    t = torch.full_like(z, float(target)) if not torch.is_tensor(target) else target.double().expand_as(z)
    loss_map = torch.clamp(z, min=0) - z * t + torch.log1p(torch.exp(-z.abs()))
    keep = torch.ones_like(z, dtype=torch.bool) if ignore_mask is None else ~ignore_mask
    loss_map = torch.where(keep, loss_map, 0.0)
    return _reduce(loss_map, keep.sum(), reduction)


def semi(logits, d, threshold=0.2, ignore_mask=None, reduction="mean"):
    x = logits.double()
    pseudo = x.detach().argmax(dim=1)
    keep = torch.sigmoid(d.detach().double()) > threshold
    considered = keep.numel()
    if ignore_mask is not None:
        keep = keep & ~ignore_mask
        considered = int((~ignore_mask).sum())
    nll = _nll(x, pseudo)
    loss_map = torch.where(keep, nll, 0.0)
    ratio = keep.sum().double() / max(considered, 1)
    return _reduce(loss_map, keep.sum(), reduction), ratio


def one_hot2d(target, c, ignore_index=255):
    valid = _valid(target, c, ignore_index)
    out = torch.nn.functional.one_hot(torch.where(valid, target, 0), c).permute(0, 3, 1, 2).double()
    return out * valid.unsqueeze(1)


def generator_loss(logits, d, target, lambda_adv, lambda_semi, threshold=0.2, ignore_index=255):
    """(total, ce, adv, semi, ratio) in float64."""
    zero = torch.zeros((), dtype=torch.float64)
    if target is not None:
        ce = cross_entropy2d(logits, target, ignore_index=ignore_index)
        adv = bce(d, 1.0, ~_valid(target, logits.shape[1], ignore_index))
        return ce + lambda_adv * adv, ce, adv, zero, zero
    adv = bce(d, 1.0)
    s, ratio = semi(logits, d, threshold)
    return lambda_adv * adv + lambda_semi * s, zero, adv, s, ratio


def discriminator_loss(d_fake, d_real, mask_fake=None, mask_real=None):
    return bce(d_fake, 0.0, mask_fake) + bce(d_real, 1.0, mask_real)


def teacher_confidence(teacher):
    """(max softmax, argmax) per pixel of float64 (N, C, H, W) teacher logits, without gradient."""
    p = torch.softmax(teacher.detach().double(), dim=1)
    return p.max(dim=1).values, teacher.detach().double().argmax(dim=1)


def pseudo_label(logits, teacher=None, d=None, confidence_threshold=0.95, d_threshold=0.2, ignore_mask=None,
                 reduction="mean"):
    """(loss, kept ratio): -log softmax(logits)[argmax teacher] over the pixels where max softmax(teacher) >= tau
    (no test when None), sigmoid(d) > d_threshold (when d is given) and not ignored; the teacher is the logits,
    detached, when None. Mean over kept pixels (0 when none)."""
    x = logits.double()
    confidence, pseudo = teacher_confidence(x if teacher is None else teacher)
    keep = torch.ones_like(pseudo, dtype=torch.bool)
    if confidence_threshold is not None:
        keep = keep & (confidence >= confidence_threshold)
    if d is not None:
        keep = keep & (torch.sigmoid(d.detach().double()) > d_threshold)
    considered = keep.numel()
    if ignore_mask is not None:
        keep = keep & ~ignore_mask
        considered = int((~ignore_mask).sum())
    loss_map = torch.where(keep, _nll(x, pseudo), 0.0)
    ratio = keep.sum().double() / max(considered, 1)
    return _reduce(loss_map, keep.sum(), reduction), ratio
