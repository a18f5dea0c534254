"""Turn a TrainConfig into data, networks, optimisers and schedules; the forward pass shared by train and evaluate."""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import ConfigError, TrainConfig
from ..models import FCDiscriminator, build_segmenter


def build_bundle(cfg: TrainConfig):
    """The data of ``cfg``; a missing folder, an unreadable file, a bad split or an ignore_index that is one of its
    classes is a ConfigError naming it."""
    from ..data import build_data

    try:
        bundle = build_data(cfg.dataset, cfg.data_root, crop_size=tuple(cfg.crop_size),
                            labelled_fraction=cfg.labelled_fraction, labelled_count=cfg.labelled_count,
                            split_seed=cfg.split_seed, split_file=cfg.split_file, scale_range=tuple(cfg.scale_range),
                            mirror=cfg.mirror, val_pad=cfg.val_pad, val_limit=cfg.val_limit,
                            ignore_index=cfg.ignore_index,
                            image_size=None if cfg.image_size is None else tuple(cfg.image_size))
    except (ValueError, OSError) as e:
        hint = " (set --data_root)" if "root" in str(e) and not cfg.data_root else ""
        raise ConfigError(f"{e}{hint}") from None
    if cfg.ignore_index < bundle.num_classes:
        raise ConfigError(f"config ignore_index={cfg.ignore_index}: that is a class of dataset {cfg.dataset} (class ids "
                          f"0..{bundle.num_classes - 1}); choose a value above them (the shipped datasets use 255)")
    return bundle


def check_data(bundle, log=print, train: bool = True) -> None:
    """Every file a run reads (only the val files without ``train``) checked before its first step
    (fastadvseg/data/check.py); a ConfigError naming a bad one."""
    from ..data.check import check_bundle

    try:
        check_bundle(bundle, log, train=train)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None


@contextlib.contextmanager
def weights_errors(path: str, key: str):
    """A weights file that is missing, damaged or of another network: a ConfigError naming it (never a traceback)."""
    try:
        yield
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    except Exception as e:  # noqa: BLE001 - torch.load / load_state_dict failures: the file does not fit
        from .checkpoint import describe_damage

        text = str(e).strip()
        reason = " ".join(text.splitlines()[:2]) if "state_dict" in text or not os.path.isfile(path) \
            else describe_damage(path, e)
        raise ConfigError(f"{key} {path} cannot be used: {reason}") from None


def _segmenter(cfg: TrainConfig, bundle, pretrained: Optional[str], what: str = "pretrained"):
    with weights_errors(pretrained or "", what):
        G = build_segmenter(cfg.model, bundle.num_classes, pretrained, batchnorm=cfg.batchnorm,
                            stride_in_1x1=cfg.stride_in_1x1, caffe_input=cfg.caffe_input, input_mean=bundle.mean,
                            input_std=bundle.std)
    # record the resolved choices with the run, so evaluation rebuilds the same network
    cfg.stride_in_1x1, cfg.caffe_input = G.backbone.stride_in_1x1, G.input_transform is not None
    return G


def start_weights(cfg: TrainConfig) -> Optional[str]:
    """The weights file the segmenter starts from: ``--pretrained FILE``, or with ``--init pretrained`` and no file the
    backbone shipped for ``cfg.model`` (checked against its recorded SHA-256); None: from scratch."""
    if cfg.pretrained or cfg.init != "pretrained":
        return cfg.pretrained
    from ..models.weights import shipped_weights

    try:
        return shipped_weights(cfg.model)
    except (KeyError, OSError, ValueError) as e:
        raise ConfigError(f"init pretrained: {e}") from None


def build_models(cfg: TrainConfig, bundle, device: torch.device, log=print, pretrained: bool = True):
    """G and D initialised from ``cfg.seed`` (so every rank and every resume builds the same ones), with the
    pretrained weights of the config unless ``pretrained`` is False (a resume: the checkpoint replaces them)."""
    torch.manual_seed(cfg.seed)
    num_classes = bundle.num_classes
    G = _segmenter(cfg, bundle, start_weights(cfg) if pretrained else None)
    if G.load_report is not None:
        log(G.load_report.summary())
    elif cfg.batchnorm == "frozen" and pretrained:
        log("WARNING: frozen BatchNorm without --pretrained weights: every BN is the identity, and a deep net trained "
            "from scratch this way blows up (measured: ResNet-101 CE 1e4 at step 1). Pass --pretrained FILE (the "
            "paper uses resnet101COCO-41f33a49.pth) or --batchnorm frozen_affine (batch statistics).")
    # With fused upsampling D returns its own low-resolution map, which the losses upsample in their kernels.
    D = FCDiscriminator(num_classes + (3 if cfg.d_image else 0), ndf=cfg.ndf, strides=cfg.d_strides,
                        upsample=not cfg.fused_upsampling)
    if cfg.pretrained_d and pretrained:
        from ..models.weights import read_state_dict

        with weights_errors(cfg.pretrained_d, "pretrained_d"):
            D.load_state_dict(read_state_dict(cfg.pretrained_d))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)


def build_teacher(cfg: TrainConfig, G) -> Optional[torch.nn.Module]:
    """The EMA teacher of mean_teacher mode (None in the other modes): a copy of the student ``G`` as it starts (after
    its pretrained weights), always in eval mode (it predicts with its running BatchNorm statistics and never updates
    them itself), taking no gradient. A resume then loads the checkpoint's teacher into it."""
    if cfg.mode != "mean_teacher":
        return None
    import copy

    teacher = copy.deepcopy(G)
    teacher.load_report = None
    return teacher.requires_grad_(False).eval()


@torch.no_grad()
def update_teacher(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for every floating-point parameter and buffer (BatchNorm
    running statistics too); integer buffers (BatchNorm's batch count) are copied."""
    s_state = student.state_dict()
    for name, t in teacher.state_dict().items():
        s = s_state[name]
        if t.is_floating_point():
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        else:
            t.copy_(s)


def build_optimizers(cfg: TrainConfig, G, D):
    opt_g = torch.optim.SGD(G.param_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=tuple(cfg.betas_d))
    return opt_g, opt_d


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - step / total) ** power


def set_lr(optimizer, base: float, step: int, total: int, power: float) -> float:
    lr = poly_lr(base, step, total, power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def make_scaler(cfg: TrainConfig, device: torch.device):
    """A GradScaler only where it is needed: fp16 on CUDA."""
    if cfg.amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def segment(G, images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Logits at 1/8 of the input, upsampled bilinearly to ``size`` (the label's)."""
    return at_size(G(images), size)


def at_size(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``x`` (N, C, h, w) upsampled bilinearly to ``size`` with the authors' align_corners=True; itself if already
    there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def predict(cfg: TrainConfig, G, images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """G's logits as the losses take them: at G's own (1/8) resolution when the losses upsample them inside their
    kernels (``fused_upsampling``), else upsampled to ``size`` first, as the authors' code does."""
    return G(images) if cfg.fused_upsampling else segment(G, images, size)


def upsampling(cfg: TrainConfig, size: Tuple[int, int]) -> dict:
    """The loss functions' arguments that upsample G's logits and D's map to the labels' ``size`` inside the kernels
    (bilinear, align_corners=True as in the authors' code); none when the inputs are already at ``size``."""
    return {"size": tuple(size), "align_corners": True} if cfg.fused_upsampling else {}


def d_input(cfg: TrainConfig, maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """What D sees: the probability (or one-hot) maps, with ``d_image`` the images beside them (C + 3 channels)."""
    return torch.cat([maps, images.to(maps.dtype)], 1) if cfg.d_image else maps


def build_segmenter_for_eval(cfg: TrainConfig, bundle, checkpoint, device: torch.device, name: str = ""):
    """G with the weights of ``checkpoint``: a training checkpoint already read (a dict with "G"), or the path of a
    training checkpoint or bare state_dict of any known layout. A file that does not fit is a ConfigError."""
    if isinstance(checkpoint, dict):
        G = _segmenter(cfg, bundle, None)
        try:
            G.load_state_dict(checkpoint["G"])
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {name} does not fit model {cfg.model} with {bundle.num_classes} classes: "
                              + " ".join(str(e).strip().splitlines()[:2])) from None
        return G.to(device).eval()
    G = _segmenter(cfg, bundle, checkpoint, "checkpoint")  # settings the config leaves open follow the file's layout
    report = G.load_report
    if report.missing or report.mismatched:
        raise ConfigError(f"checkpoint {checkpoint} does not fit model {cfg.model} with {bundle.num_classes} "
                          f"classes: " + report.summary().replace("\n", ";"))
    return G.to(device).eval()
