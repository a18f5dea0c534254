"""``--authors-loop``: the authors' training iteration as a baseline, beside the same iteration with our losses.

A port to current PyTorch of one iteration of Hung et al.'s AdvSemiSeg (github.com/hfslyc/AdvSemiSeg, ``train.py``
and ``utils/loss.py``, read from the repository's last commit, 841d546), kept as they wrote it:

* their ``CrossEntropy2d``: a boolean mask of the valid labels, the logits transposed to NHWC, made contiguous and
  masked (``predict[mask.view(n, h, w, 1).repeat(1, 1, 1, c)].view(-1, c)``), then ``F.cross_entropy`` on the
  selected pixels; their ``BCEWithLogitsLoss2d``: the same masking, then ``F.binary_cross_entropy_with_logits``;
* the numpy round trips: D's confidence ``sigmoid(D_out)`` and the WHOLE logit tensor go to the host
  (``.data.cpu().numpy()``), the pseudo-labels are ``argmax`` in numpy, the semi mask and ``make_D_label``'s target
  maps (ones * label, 255 at ignored pixels) are built in numpy and sent back, the one-hot of the ground truth is a
  numpy loop over the classes; each loss value is read back to the host (``loss.data.cpu().numpy()[0]``, now
  ``.item()``) for their log line;
* their interpolation: ``nn.Upsample(size, mode='bilinear', align_corners=True)`` after G and after D (their D has
  no upsampling inside; here D is ``fastadvseg.models.FCDiscriminator`` run up to its classifier, see
  :func:`d_low_res`, then their ``interp``: the same function as that D's forward);
* their order: the unlabelled batch first (L_semi_adv + L_semi, one backward), then the labelled batch (L_ce +
  lambda_adv L_adv, one backward), D frozen by ``requires_grad = False`` on each parameter; then D on the detached
  predictions of both batches (``D_remain``: labelled ignore pixels excluded) and on the one-hot ground truth, each
  term halved and back-propagated on its own; then both optimizer steps.

Changes forced by current PyTorch, none of which changes a value: ``Variable`` dropped, ``size_average=True`` ->
the default ``reduction='mean'``, ``F.sigmoid`` -> ``torch.sigmoid``, ``F.softmax(pred)`` -> ``dim=1`` (what the
implicit dim was for 4-D input), an empty selection tested with ``numel()`` (old PyTorch gave it dim 0),
``np.bool`` -> ``bool``, ``.cuda(gpu)`` -> ``.to(device)``, ``zero_grad()`` now sets the gradients to None (current
PyTorch's default). Their ``interp`` was built with ``size=(input_size[1], input_size[0])`` -- (w, h) -- which
equals (h, w) for their square 321x321 crops; the port passes (h, w) so that non-square shapes work. Data loading
is not part of the iteration: the batches are given (on the host, as their DataLoader gives them), and the
labelled batch's labels stand in for their separate ``trainloader_gt`` batch.

:func:`authors_step` is the ``authors`` impl of ``--authors-loop`` (benchmarks/train_step.py), timed beside the
pipeline's :func:`fastadvseg.utils.step.train_step` on the same G, D, optimizers and batches: the same computation
(tests/test_benchmarks_smoke.py checks that one iteration of each from the same weights gives the same losses and
weights).
"""
from __future__ import annotations

import itertools
import types
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cases import IGNORE
from .shapes import Shape


# --- utils/loss.py ------------------------------------------------------------------------------------------------

class CrossEntropy2d(nn.Module):

    def __init__(self, size_average=True, ignore_label=255):
        super().__init__()
        self.size_average = size_average
        self.ignore_label = ignore_label

    def forward(self, predict, target, weight=None):
        assert not target.requires_grad
        assert predict.dim() == 4
        assert target.dim() == 3
        assert predict.size(0) == target.size(0), "{0} vs {1} ".format(predict.size(0), target.size(0))
        assert predict.size(2) == target.size(1), "{0} vs {1} ".format(predict.size(2), target.size(1))
        assert predict.size(3) == target.size(2), "{0} vs {1} ".format(predict.size(3), target.size(3))
        n, c, h, w = predict.size()
        target_mask = (target >= 0) * (target != self.ignore_label)
        target = target[target_mask]
        if not target.numel():  # was: if not target.data.dim()
            return torch.zeros(1, device=predict.device)
        predict = predict.transpose(1, 2).transpose(2, 3).contiguous()
        predict = predict[target_mask.view(n, h, w, 1).repeat(1, 1, 1, c)].view(-1, c)
        loss = F.cross_entropy(predict, target, weight=weight, reduction="mean" if self.size_average else "sum")
        return loss


class BCEWithLogitsLoss2d(nn.Module):

    def __init__(self, size_average=True, ignore_label=255):
        super().__init__()
        self.size_average = size_average
        self.ignore_label = ignore_label

    def forward(self, predict, target, weight=None):
        assert not target.requires_grad
        assert predict.dim() == 4
        assert target.dim() == 4
        assert predict.size(0) == target.size(0), "{0} vs {1} ".format(predict.size(0), target.size(0))
        assert predict.size(2) == target.size(2), "{0} vs {1} ".format(predict.size(2), target.size(2))
        assert predict.size(3) == target.size(3), "{0} vs {1} ".format(predict.size(3), target.size(3))
        n, c, h, w = predict.size()
        target_mask = (target >= 0) * (target != self.ignore_label)
        target = target[target_mask]
        if not target.numel():
            return torch.zeros(1, device=predict.device)
        predict = predict[target_mask]
        loss = F.binary_cross_entropy_with_logits(predict, target, weight=weight,
                                                  reduction="mean" if self.size_average else "sum")
        return loss


# --- train.py -----------------------------------------------------------------------------------------------------

def loss_calc(pred, label, device):
    label = label.long().to(device)
    criterion = CrossEntropy2d().to(device)
    return criterion(pred, label)


def lr_poly(base_lr, iter, max_iter, power):
    return base_lr * ((1 - float(iter) / max_iter) ** power)


def adjust_learning_rate(optimizer, base_lr, i_iter, num_steps, power=0.9):
    lr = lr_poly(base_lr, i_iter, num_steps, power)
    optimizer.param_groups[0]["lr"] = lr
    if len(optimizer.param_groups) > 1:
        optimizer.param_groups[1]["lr"] = lr * 10


def one_hot(label, num_classes):
    label = label.numpy()
    one_hot = np.zeros((label.shape[0], num_classes, label.shape[1], label.shape[2]), dtype=label.dtype)
    for i in range(num_classes):
        one_hot[:, i, ...] = (label == i)
    # handle ignore labels
    return torch.FloatTensor(one_hot)


def make_D_label(label, ignore_mask, device):
    ignore_mask = np.expand_dims(ignore_mask, axis=1)
    D_label = np.ones(ignore_mask.shape) * label
    D_label[ignore_mask] = 255
    D_label = torch.FloatTensor(D_label).to(device)
    return D_label


def d_low_res(model_D: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The authors' FCDiscriminator.forward (4x4 stride-2 convs, LeakyReLU 0.2, classifier; no upsampling) with the
    weights of a ``fastadvseg.models.FCDiscriminator``, whose own forward adds the upsampling that ``interp`` does
    in their loop."""
    for conv in model_D.convs:
        x = model_D.leaky_relu(conv(x))
    return model_D.classifier(x)


class AuthorsIteration:
    """One iteration of their ``for i_iter in range(args.num_steps)`` body (``iter_size`` 1, ``D_remain`` True,
    past ``semi_start``); ``__call__`` returns the loss values they print."""

    def __init__(self, model, model_D, optimizer, optimizer_D, args, input_size, device):
        """``args``: their command line's values (``iter_size`` 1, ``D_remain`` True)."""
        self.model, self.model_D, self.optimizer, self.optimizer_D = model, model_D, optimizer, optimizer_D
        self.args = args
        self.device = device
        self.bce_loss = BCEWithLogitsLoss2d()
        self.interp = nn.Upsample(size=tuple(input_size), mode="bilinear", align_corners=True)
        self.pred_label, self.gt_label = 0, 1

    def __call__(self, i_iter: int, batch_l, batch_remain, batch_gt) -> Dict[str, float]:
        """``batch_l``: (images, labels) of the labelled loader; ``batch_remain``: the unlabelled loader's images;
        ``batch_gt``: the ground-truth loader's labels. Host tensors, as their DataLoaders give them."""
        args, model, model_D, interp, bce_loss = self.args, self.model, self.model_D, self.interp, self.bce_loss
        optimizer, optimizer_D, dev = self.optimizer, self.optimizer_D, self.device
        loss_seg_value = loss_adv_pred_value = loss_D_value = loss_semi_value = loss_semi_adv_value = 0
        semi_ratio = None

        optimizer.zero_grad()
        adjust_learning_rate(optimizer, args.learning_rate, i_iter, args.num_steps, args.power)
        optimizer_D.zero_grad()
        adjust_learning_rate(optimizer_D, args.learning_rate_D, i_iter, args.num_steps, args.power)

        # train G
        # don't accumulate grads in D
        for param in model_D.parameters():
            param.requires_grad = False

        # do semi first
        images = batch_remain.to(dev)
        pred = interp(model(images))
        pred_remain = pred.detach()

        D_out = interp(d_low_res(model_D, F.softmax(pred, dim=1)))
        D_out_sigmoid = torch.sigmoid(D_out).data.cpu().numpy().squeeze(axis=1)

        ignore_mask_remain = np.zeros(D_out_sigmoid.shape).astype(bool)

        loss_semi_adv = args.lambda_semi_adv * bce_loss(D_out, make_D_label(self.gt_label, ignore_mask_remain, dev))
        loss_semi_adv = loss_semi_adv / args.iter_size
        loss_semi_adv_value += loss_semi_adv.item() / args.lambda_semi_adv

        if args.lambda_semi <= 0 or i_iter < args.semi_start:
            loss_semi_adv.backward()
            loss_semi_value = 0
        else:
            # produce ignore mask
            semi_ignore_mask = (D_out_sigmoid < args.mask_T)

            semi_gt = pred.data.cpu().numpy().argmax(axis=1)
            semi_gt[semi_ignore_mask] = 255

            semi_ratio = 1.0 - float(semi_ignore_mask.sum()) / semi_ignore_mask.size

            if semi_ratio == 0.0:  # (as they wrote it: L_semi_adv is then not back-propagated)
                loss_semi_value += 0
            else:
                semi_gt = torch.FloatTensor(semi_gt)

                loss_semi = args.lambda_semi * loss_calc(pred, semi_gt, dev)
                loss_semi = loss_semi / args.iter_size
                loss_semi_value += loss_semi.item() / args.lambda_semi
                loss_semi += loss_semi_adv
                loss_semi.backward()

        # train with source
        images, labels = batch_l
        images = images.to(dev)
        ignore_mask = (labels.numpy() == 255)
        pred = interp(model(images))

        loss_seg = loss_calc(pred, labels, dev)

        D_out = interp(d_low_res(model_D, F.softmax(pred, dim=1)))

        loss_adv_pred = bce_loss(D_out, make_D_label(self.gt_label, ignore_mask, dev))

        loss = loss_seg + args.lambda_adv_pred * loss_adv_pred

        # proper normalization
        loss = loss / args.iter_size
        loss.backward()
        loss_seg_value += loss_seg.item() / args.iter_size
        loss_adv_pred_value += loss_adv_pred.item() / args.iter_size

        # train D
        # bring back requires_grad
        for param in model_D.parameters():
            param.requires_grad = True

        # train with pred
        pred = pred.detach()

        if args.D_remain:
            pred = torch.cat((pred, pred_remain), 0)
            ignore_mask = np.concatenate((ignore_mask, ignore_mask_remain), axis=0)

        D_out = interp(d_low_res(model_D, F.softmax(pred, dim=1)))
        loss_D = bce_loss(D_out, make_D_label(self.pred_label, ignore_mask, dev))
        loss_D = loss_D / args.iter_size / 2
        loss_D.backward()
        loss_D_value += loss_D.item()

        # train with gt
        labels_gt = batch_gt
        D_gt_v = one_hot(labels_gt, args.num_classes).to(dev)
        ignore_mask_gt = (labels_gt.numpy() == 255)

        D_out = interp(d_low_res(model_D, D_gt_v))
        loss_D = bce_loss(D_out, make_D_label(self.gt_label, ignore_mask_gt, dev))
        loss_D = loss_D / args.iter_size / 2
        loss_D.backward()
        loss_D_value += loss_D.item()

        optimizer.step()
        optimizer_D.step()
        return {"loss_seg": loss_seg_value, "loss_adv_p": loss_adv_pred_value, "loss_D": loss_D_value,
                "loss_semi": loss_semi_value, "loss_semi_adv": loss_semi_adv_value, "semi_ratio": semi_ratio}


# --- the comparison -----------------------------------------------------------------------------------------------

def build_authors(shape: Shape, device: torch.device, segmenter: Optional[str] = None, seed: int = 0, **config):
    """(AuthorsIteration, cfg, nets, batch): the authors' iteration on the G, D and optimizers that
    benchmarks.train_step.build_pipeline builds (same seed: the same initial weights as every other variant), with
    the config's learning rates, schedule, lambdas and threshold (the paper's: lambda_adv 0.01, lambda_semi_adv 0.001,
    lambda_semi 0.1, T_semi 0.2; their train.py's default lambda_adv_pred is 0.1, their README trains with 0.01)."""
    from .train_step import build_pipeline

    cfg, nets, batch = build_pipeline(shape, device, seed=seed, model=segmenter, **config)
    args = types.SimpleNamespace(
        num_classes=shape.c, learning_rate=cfg.lr, learning_rate_D=cfg.lr_d, num_steps=cfg.steps, power=cfg.power,
        lambda_adv_pred=cfg.lambda_adv, lambda_semi=cfg.lambda_semi, lambda_semi_adv=cfg.lambda_semi_adv,
        mask_T=cfg.semi_threshold, semi_start=cfg.semi_start, semi_start_adv=0, iter_size=1, D_remain=True,
        ignore_label=IGNORE)
    it = AuthorsIteration(nets.G, nets.D, nets.opt_g, nets.opt_d, args, (shape.h, shape.w), device)
    return it, cfg, nets, batch


def authors_step(shape: Shape, device: torch.device, segmenter: Optional[str] = None):
    """A zero-argument callable: one iteration of the port on its own G, D and optimizers, the batch on the host."""
    it, cfg, _, (images, labels, images_u) = build_authors(shape, device, segmenter)
    counter = itertools.count()
    return lambda: it(next(counter) % cfg.steps, (images, labels), images_u, labels)
