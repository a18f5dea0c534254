"""The masked self-training loss L_semi, its kept fraction and its logits gradient in one pass.

Per pixel with discriminator logit z (an (N, H, W) map of any strides and float dtype) and logits x::

    pseudo = argmax_c x                  (first maximum on ties, like torch.argmax)
    keep   = float32(z) > logit(T)  and not ignore_mask   (sigmoid(z) > T decided exactly: fastadvseg/_keep.py)
    nll    = logsumexp_c(x) - x[pseudo]  at kept pixels, 0 elsewhere
    G[c]   = softmax(x)[c] - [c == pseudo]   at kept pixels (gradient of the unnormalised sum), 0 elsewhere

This is the pseudo-label loss with the logits as their own teacher, no confidence threshold and a D map, so it is
launched as that: :mod:`.pseudo_label`'s kernels under HAS_TEACHER = HAS_TAU = False, HAS_D = True (constexpr
flags: the teacher and the confidence test are compiled away, not skipped at run time). Sums, loss map, gradient,
bytes moved, the upsampled path (each of x and z read upsampled to ``size`` from its own resolution, the gradient
gathered by bilinear.py's two passes) and the register budget are that module's.
"""
from .pseudo_label import pseudo_label_forward, pseudo_label_gradient


def semi_gradient(x, d, ignore_mask, keep_logit: float, grad, geo, zgeo, up_z: bool) -> None:
    """The gradient of the L_semi sum w.r.t. logits x (N, C, h, w) read upsampled by ``geo``, into ``grad``; z is
    read upsampled by ``zgeo`` (up_z) or at full resolution. Shared with the unlabelled generator loss."""
    pseudo_label_gradient(x, None, d, ignore_mask, keep_logit, None, grad, geo, zgeo=zgeo if up_z else None)


def semi_forward(x, d, threshold: float, ignore_mask, *, store_grad: bool, store_map: bool, size=None,
                 align_corners: bool = False):
    """x: (N, C, h, w), d: (N, hd, wd) view, each read upsampled to size = (H, W) where its size differs (without a
    size all are at x's size). Returns (loss_sum, kept, considered, loss_map (N, H, W) or None, gradient w.r.t. x
    or None)."""
    return pseudo_label_forward(x, None, d, None, threshold, ignore_mask, store_grad=store_grad,
                                store_map=store_map, size=size, align_corners=align_corners)
