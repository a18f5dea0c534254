"""The training configuration: ONE dataclass, loadable from YAML/JSON, every field overridable as ``--key value``
and documented by its own metadata (group and help: what ``--help`` prints).

Field defaults are the paper's PASCAL VOC recipe (Hung et al. 2018, section 4) EXCEPT those marked "synthetic
default": with no arguments, ``python -m fastadvseg.train`` trains the compact model FROM SCRATCH on the embedded
synthetic data in about 3 minutes on 2 CPU cores. Besides sizes (crop, batch, steps, semi_start, ndf), training from
scratch changes three optimisation settings that the paper tuned for fine-tuning a COCO-pretrained ResNet-101:
lr 0.02 with no 10x head (measured on the synthetic task: 2.5e-4 learns nothing useful in 500 steps, a 10x head
halves the mIoU) and live BatchNorm (learnt scale and shift). The shipped configs (``fastadvseg/configs/*.yaml``:
``voc_1_8`` ... ``cityscapes_1_4``) restore the paper's settings; ``--config NAME`` picks one, ``--config path.yaml``
reads a file.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

MODES = ("baseline", "adv", "semi", "selftrain", "mean_teacher")
# the modes that train on the unlabelled images (at a label fraction of 1 there are none)
UNLABELLED_MODES = ("semi", "selftrain", "mean_teacher")
# the modes with a discriminator step and L_adv
ADVERSARIAL_MODES = ("adv", "semi", "selftrain")
INITS = ("scratch", "pretrained")
AMP_MODES = ("none", "bf16", "fp16")
LOSS_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
ALLOCATORS = ("auto", "steady", "jemalloc", "tcmalloc", "system")  # fastadvseg/utils/allocator.py

# What the training pipeline needs beyond the losses (which need torch and numpy only): `pip install
# "fastadvseg[train]"`. (import name, distribution name)
PIPELINE_EXTRAS = (("yaml", "pyyaml"), ("matplotlib", "matplotlib"), ("PIL", "pillow"))


def missing_pipeline_extras() -> List[str]:
    """The distributions of PIPELINE_EXTRAS that cannot be imported here."""
    missing = []
    for module, dist in PIPELINE_EXTRAS:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def require_pipeline_extras(program: str) -> None:
    """ConfigError (one line) naming what ``program`` needs and how to install it, before it starts any work."""
    missing = missing_pipeline_extras()
    if missing:
        raise ConfigError(f"{program} needs {', '.join(d for _, d in PIPELINE_EXTRAS)}, which the library alone "
                          f"does not install; missing here: {', '.join(missing)}. Install them with "
                          f"pip install 'fastadvseg[train]' (in a clone: pip install -e '.[train]')")


def _yaml():
    """pyyaml, imported where a config is read or written: the losses alone do not need it."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading or writing a YAML config needs pyyaml: pip install 'fastadvseg[train]'") from None
    return yaml


def _setting(group: str, default: Any, help: str) -> Any:
    """A field of :class:`TrainConfig`: its default and what ``--help`` says of it (its group, its meaning; the first
    sentence of ``help`` is the one-line summary)."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help})


@dataclass
class TrainConfig:
    name: Optional[str] = _setting("run", None, "run directory name under run_root (default: a timestamp)")
    seed: int = _setting("run", 1234, "model init, batch order and augmentation all derive from it")
    device: str = _setting("run", "auto", '"auto" (cuda if available), "cpu", "cuda", "cuda:1"')

    dataset: str = _setting("data", "synthetic", '"synthetic" (embedded, no download), "voc", "cityscapes", "folder"')
    data_root: Optional[str] = _setting("data", None, "the dataset's folder (not needed for synthetic)")
    ignore_index: int = _setting("data", 255,
        "the mask value of pixels no loss, discriminator or metric counts (also what padding fills in); 0..255, above "
        "the class ids. The masks of synthetic, voc and cityscapes use 255: change it only for a folder dataset "
        "whose masks mark ignored pixels otherwise")
    image_size: Optional[Tuple[int, int]] = _setting("data", None,
        "resize every train and val item to (h, w) first (image bilinear, label nearest); paper Cityscapes: 512x1024")
    crop_size: Tuple[int, int] = _setting("data", (64, 64),
        "training crop (h, w); synthetic default; paper VOC: 321x321")
    scale_range: Tuple[float, float] = _setting("data", (0.5, 1.5), "random scale of training items (low, high)")
    mirror: bool = _setting("data", True, "random horizontal flip of training items")
    labelled_fraction: float = _setting("data", 0.125, "1/8, 1/4, 1/2 or 1 of the training ids")
    labelled_count: Optional[int] = _setting("data", None, "an absolute count instead of the fraction")
    split_seed: int = _setting("data", 0,
        "the labelled/unlabelled split is drawn with this seed and saved with the run")
    split_file: Optional[str] = _setting("data", None, "reuse a saved split (a run's split.json)")
    val_pad: Optional[int] = _setting("data", None, "pad val images to N x N so they batch; VOC protocol: 505")
    val_limit: Optional[int] = _setting("data", 96, "evaluate on the first N val images (None: all); synthetic default")
    num_workers: int = _setting("data", 0, "DataLoader worker processes")

    model: str = _setting("model", "deeplabv2_compact",
        "the segmenter (fastadvseg.models.SEGMENTERS); synthetic default; paper: deeplabv2_resnet101")
    pretrained: Optional[str] = _setting("model", None,
        "local weights file (torchvision ImageNet or the authors' COCO layout)")
    init: Optional[str] = _setting("model", None,
        "the segmenter's start: \"scratch\" (random init) or \"pretrained\" (--pretrained FILE, else, for "
        "deeplabv2_compact, the backbone shipped in the package: pretrained on a disjoint synthetic task by python -m "
        "fastadvseg.pretrain, no download); none: pretrained exactly when --pretrained is given")
    pretrained_d: Optional[str] = _setting("model", None, "local discriminator state_dict")
    batchnorm: str = _setting("model", "live",
        "BatchNorm of the segmenter in training: live (batch statistics, learnt scale and shift; synthetic default), "
        "frozen_affine (batch statistics, frozen scale and shift: the authors' script, the voc_* configs) or frozen "
        "(eval mode: running statistics never updated, frozen scale and shift). frozen_affine is what the authors' "
        "training script does: it calls model.train() on a DeepLab whose BatchNorm parameters have requires_grad "
        "off, so each batch is normalised with its own statistics and the running statistics keep moving (evaluation "
        "uses them). frozen keeps the pretrained statistics: for batches too small for statistics of their own (the "
        "cityscapes_* configs, batch 2); it needs --pretrained (an untrained net's BatchNorm is then the identity)")
    stride_in_1x1: Optional[bool] = _setting("model", None,
        "bottleneck stride on the 1x1 conv (authors' DeepLab/Caffe layout) or the 3x3 (torchvision); None: as the "
        "pretrained file's layout says (1x1 without a file). The run's config.yaml records the resolved value.")
    caffe_input: Optional[bool] = _setting("model", None,
        "feed the net Caffe input (BGR, 0..255, Caffe mean subtracted), as the authors' Caffe-trained COCO weights "
        "expect; None: true exactly for the DeepLab/COCO weights layout. Recorded resolved in the run's config.yaml.")
    ndf: int = _setting("model", 32, "discriminator width; synthetic default; paper: 64")
    d_strides: int = _setting("model", 5,
        "how many of D's 5 convolutions have stride 2 (the first ones; the others are 3x3 stride 1), 0..5. D judges "
        "a map of crop / 2^d_strides cells a side: 5 is the paper's D (about 10x10 cells on VOC's 321-pixel crops, "
        "2x2 on the synthetic 64-pixel crops, so its confidence there is nearly one value per image); 3 gives 8x8 "
        "cells on the synthetic crops")

    mode: str = _setting("losses", "semi",
        "baseline (L_ce), adv (+L_adv), semi (+L_adv on unlabelled + L_semi). Two controls that use the unlabelled "
        "images without the discriminator's judgement: selftrain (semi with L_semi's pixels chosen by G's own "
        "confidence, max softmax >= selftrain_threshold, instead of sigmoid(D) > semi_threshold; L_adv as in semi) "
        "and mean_teacher (L_ce on the labelled batch, no adversarial terms; on the unlabelled batch the student "
        "learns from CutMix blends of two crops the pseudo-labels of an EMA teacher, blended with the same box, "
        "where the teacher's confidence >= teacher_threshold; French et al., BMVC 2020)")
    lambda_adv: float = _setting("losses", 0.01, "weight of L_adv on labelled images")
    lambda_semi: float = _setting("losses", 0.1, "weight of L_semi (pseudo-labels where D is confident)")
    lambda_semi_adv: float = _setting("losses", 0.001, "weight of L_adv on unlabelled images")
    semi_threshold: float = _setting("losses", 0.2, "T_semi: L_semi keeps pixels where sigmoid(D) > T_semi")
    selftrain_threshold: float = _setting("losses", 0.95,
        "selftrain mode: L_semi keeps the pixels where G's max softmax >= this (0.95: FixMatch's confidence "
        "threshold); fixed before any selftrain result was seen")
    lambda_cutmix: float = _setting("losses", 1.0,
        "mean_teacher mode: weight of the CutMix loss (cross-entropy of the student on the blends against the "
        "teacher's kept pseudo-labels, mean over the kept pixels); 1.0 as in French et al.")
    teacher_decay: float = _setting("losses", 0.99,
        "mean_teacher mode: the teacher is an EMA of the student, teacher <- decay * teacher + (1 - decay) * student "
        "after every step (weights and BatchNorm statistics), in [0, 1)")
    teacher_threshold: float = _setting("losses", 0.95,
        "mean_teacher mode: the student learns a teacher pseudo-label only where the teacher's max softmax >= this "
        "(0.95); fixed before any mean_teacher result was seen")
    d_unlabelled: bool = _setting("losses", True,
        "D also sees the unlabelled predictions as fake (the authors' D_remain)")
    d_real_smoothing: float = _setting("losses", 0.0,
        "a remedy for D's entropy shortcut, off by default (the paper's recipe): D's real input is the one-hot ground "
        "truth smoothed to (1 - eps) one-hot + eps / C, so a low entropy alone no longer tells real from predicted "
        "maps")
    fused_upsampling: bool = _setting("losses", True,
        "the losses take G's 1/8-resolution logits and D's own low-resolution map and upsample them inside their "
        "kernels (align_corners=True, as the authors' code): the same losses without the full-resolution logits or "
        "their gradient in memory; false: F.interpolate to the label size first, then the losses, as the authors' "
        "code does (runs saved before this setting existed resume with false)")
    d_image: bool = _setting("losses", False,
        "the other remedy, off by default: D sees the (normalised) image beside the probability map (C + 3 input "
        "channels), so it can judge a map against the image it segments, not only by its entropy")

    batch_size: int = _setting("optimisation", 8, "global batch (split over DDP ranks); synthetic default; paper: 10")
    lr: float = _setting("optimisation", 0.02, "SGD learning rate of G; synthetic default; paper: 2.5e-4")
    head_lr_mult: float = _setting("optimisation", 1.0,
        "the classifier head's lr multiplier; synthetic default; paper: 10")
    momentum: float = _setting("optimisation", 0.9, "SGD momentum of G, in [0, 1)")
    weight_decay: float = _setting("optimisation", 5e-4, "SGD weight decay of G")
    lr_d: float = _setting("optimisation", 1e-4, "Adam learning rate of D")
    betas_d: Tuple[float, float] = _setting("optimisation", (0.9, 0.99), "Adam betas of D, each in [0, 1)")

    steps: int = _setting("schedule", 900, "training iterations; synthetic default; paper: 20000")
    power: float = _setting("schedule", 0.9, "poly learning-rate decay: lr * (1 - step/steps)^power")
    semi_start: int = _setting("schedule", 225,
        "first step of L_semi; synthetic default (1/4 of the steps, as the paper's 5000 of 20000)")

    num_threads: Optional[int] = _setting("speed", 1,
        "torch intra-op threads when training on the CPU (None: torch's default, one per core). 1 is the fastest for "
        "the small default model on a shared 2-core machine: measured 5x faster than 2 threads when other jobs load "
        "the CPUs.")
    amp: str = _setting("speed", "none", '"none", "bf16", "fp16" (fp16 uses a GradScaler on CUDA)')
    channels_last: bool = _setting("speed", False, "channels-last memory format for the nets")
    loss_backend: str = _setting("speed", "auto", "auto, reference, cpu, triton, cuda")
    allocator: str = _setting("speed", "auto",
        "The memory allocator of the program's process (fastadvseg/utils/allocator.py). auto: a preloaded jemalloc or "
        "tcmalloc, else steady; steady: glibc mallopt keeps freed buffers for reuse (no page faults every step); "
        "jemalloc, tcmalloc: restart with that library preloaded; system: the C library's defaults. Set by the command "
        "line programs for their own process; config.yaml records what the run used")

    run_root: str = _setting("output", "runs", "run directories are created under it")
    log_every: int = _setting("output", 10, "print and record losses averaged over this many steps")
    eval_every: int = _setting("output", 300, "validate every N steps (0: only at the end)")
    checkpoint_every: int = _setting("output", 100, "write checkpoints/last.pt every N steps (0: only at the end)")
    eval_batch_size: int = _setting("output", 8, "images per evaluation batch")
    num_vis_images: int = _setting("output", 4, "val images shown in samples.png")
    plots: bool = _setting("output", True, "write losses.png, miou.png, samples.png at the end")
    eval_test: bool = _setting("output", False,
        "at the end, also score the final model on the held-out test split (synthetic: 200 images disjoint from train "
        "and val); written to summary.json and eval_test.md, never used to choose anything (best.pt is chosen on val)")
    tensorboard: bool = _setting("output", False,
        "also log to RUN/tensorboard (needs the optional tensorboard package)")

    def validate(self) -> "TrainConfig":
        """Refuse values that cannot work (ConfigError naming the key), before anything is built or written."""
        def bad(key, msg):
            raise ConfigError(f"config {key}={getattr(self, key)!r}: {msg}")

        from .data import DATASETS
        from .models import BATCHNORM_MODES, SEGMENTERS

        for key, choices in (("model", SEGMENTERS), ("mode", MODES), ("amp", AMP_MODES),
                             ("loss_backend", LOSS_BACKENDS), ("dataset", DATASETS), ("allocator", ALLOCATORS),
                             ("batchnorm", BATCHNORM_MODES)):
            if getattr(self, key) not in choices:
                bad(key, f"choose one of {tuple(choices)}")
        if self.init is not None and self.init not in INITS:
            bad("init", f"choose one of {INITS} (or none: pretrained exactly when --pretrained is given)")
        if self.init == "scratch" and self.pretrained:
            bad("init", f"contradicts --pretrained {self.pretrained}: drop one of them")
        if self.init == "pretrained" and not self.pretrained:
            from .models.weights import SHIPPED

            if self.model not in SHIPPED:
                bad("init", f"no pretrained weights are shipped for model {self.model} (only for "
                            f"{', '.join(SHIPPED)}): give --pretrained FILE")
        for key in ("batch_size", "steps", "log_every", "eval_batch_size", "ndf"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("eval_every", "checkpoint_every", "semi_start", "num_workers", "num_vis_images"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        for key in ("labelled_count", "val_pad", "val_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, "must be >= 1 (or none)")
        if not 0 <= self.ignore_index <= 255:
            bad("ignore_index", "must be a mask value in 0..255 (the shipped datasets use 255)")
        if self.num_threads is not None and self.num_threads < 0:
            bad("num_threads", "must be >= 0 (or none: torch's default)")
        # numbers: a NaN or an infinity is never meaningful here
        for key in ("lr", "lr_d", "head_lr_mult"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                bad(key, "must be a finite number > 0")
        for key in ("weight_decay", "power", "lambda_adv", "lambda_semi", "lambda_semi_adv", "lambda_cutmix"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                bad(key, "must be a finite number >= 0")
        if not 0 <= self.momentum < 1:
            bad("momentum", "must be in [0, 1)")
        if not all(0 <= b < 1 for b in self.betas_d):
            bad("betas_d", "each must be in [0, 1)")
        if not 0 < self.labelled_fraction <= 1:
            bad("labelled_fraction", "must be in (0, 1]")
        if not 0 <= self.d_real_smoothing < 1:
            bad("d_real_smoothing", "must be in [0, 1)")
        for key in ("semi_threshold", "selftrain_threshold", "teacher_threshold"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, "must be in [0, 1]")
        if not 0 <= self.teacher_decay < 1:
            bad("teacher_decay", "must be in [0, 1)")
        if not 0 <= self.d_strides <= 5:
            bad("d_strides", "must be in 0..5 (the number of D's 5 convolutions with stride 2; the paper's D: 5)")
        lo, hi = self.scale_range
        if not (math.isfinite(hi) and 0 < lo <= hi):
            bad("scale_range", "must be (low, high) with 0 < low <= high, both finite")
        if min(self.crop_size) < 33:
            bad("crop_size", "must be at least 33x33 (the discriminator downsamples by 32)")
        if self.device != "auto":
            import torch

            try:
                device = torch.device(self.device)
            except RuntimeError:
                bad("device", "expected auto, cpu, cuda or cuda:N")
            if device.type == "cuda" and not torch.cuda.is_available():
                bad("device", "CUDA is not available here (torch.cuda.is_available() is False); use --device cpu")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            bad("tensorboard", "needs the tensorboard package (pip install tensorboard), which is not installed")
        if self.image_size is not None and min(self.image_size) < 33:
            bad("image_size", "must be at least 33x33 (or none: items keep their size)")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

# Settings an earlier version spelled otherwise: old key -> (its type, the key that replaced it, old value -> new
# value), so that the config files, checkpoints and command lines of that version keep their meaning.
_REPLACED = {"freeze_bn": (bool, "batchnorm", lambda frozen: "frozen" if frozen else "live")}


# Settings added after runs were saved without them, whose default would change what such a run computes: a saved
# config (a checkpoint's) that lacks one gets the value that reproduces the version that wrote it.
ADDED_SINCE = {"fused_upsampling": False}


def saved_config(values: Dict[str, Any]) -> TrainConfig:
    """The config a checkpoint saved (unvalidated: it is validated with the resume's overrides applied)."""
    return from_dict({**ADDED_SINCE, **values}, validate=False)


def with_current_keys(values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` (a config file, a checkpoint's config, overrides) with each key of an earlier version turned into
    the setting that replaced it; a ConfigError if both are given or the old value does not parse."""
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in _REPLACED:
            tp, new_key, convert = _REPLACED[key]
            if new_key in values:
                raise ConfigError(f"config {key} and {new_key}: {key} is the older name of {new_key}; give only "
                                  f"{new_key}")
            try:
                value = convert(_scalar(tp, _parse_scalar(value) if isinstance(value, str) else value))
            except (TypeError, ValueError):
                raise ConfigError(f"config {key}: cannot use {value!r} as {tp.__name__}") from None
            key = new_key
        out[key] = value
    return out


def _coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (from YAML/JSON or a command-line string) to the type of field ``key``."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if isinstance(value, str) and hint is not str:
        value = _parse_scalar(value)
    if isinstance(value, str) and value.lower() in ("none", "null") and optional:
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config {key}: None is not allowed (expected {_type_name(hint)})")
    try:
        if typing.get_origin(hint) is tuple:
            elem = typing.get_args(hint)
            n = len(elem)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * n  # "321" -> 321x321
            if isinstance(value, str):
                value = [_parse_scalar(v) for v in value.replace("x", ",").split(",")]
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise ValueError
            return tuple(_scalar(e, v) for e, v in zip(elem, value))
        return _scalar(hint, value)
    except (TypeError, ValueError):
        raise ConfigError(f"config {key}: cannot use {value!r} as {_type_name(_HINTS[key])}") from None


def _parse_scalar(text: str) -> Any:
    yaml = _yaml()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _scalar(tp, value):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if tp is str:
        return str(value)
    raise TypeError(tp)


def _metavar(hint) -> str:
    """INT, FLOAT, BOOL, STR; A,B for pairs; "|none" where None is allowed."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return _metavar(next(a for a in args if a is not type(None))) + "|none"
    if typing.get_origin(hint) is tuple:
        return ",".join(_metavar(a) for a in args)
    return hint.__name__.upper()


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def shipped_configs() -> List[str]:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(CONFIG_DIR) if f.endswith((".yaml", ".yml", ".json")))


def resolve_config_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    for ext in (".yaml", ".yml", ".json", ""):
        path = os.path.join(CONFIG_DIR, name_or_path + ext)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def read_config_file(name_or_path: str) -> Dict[str, Any]:
    """The mapping in a YAML/JSON config file; a file that cannot be read or parsed is a ConfigError naming it."""
    path = resolve_config_path(name_or_path)
    yaml = _yaml()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {what}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def from_dict(values: Dict[str, Any], base: Optional[TrainConfig] = None, validate: bool = True) -> TrainConfig:
    """``base`` (default: the defaults) with ``values`` applied; unknown keys and bad values raise ConfigError.
    ``validate=False`` skips the checks of the whole config (for a saved config that overrides complete, e.g. a
    CUDA run's config resumed with ``--device cpu``)."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in with_current_keys(values).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown config key {key!r}" + _suggest(key))
        setattr(cfg, key, _coerce(key, value))
    return cfg.validate() if validate else cfg


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(_FIELDS), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def parse_overrides(argv: Sequence[str]) -> Dict[str, Any]:
    """``["--steps", "100", "--mirror", "--crop_size=65,65"]`` -> ``{"steps": "100", "mirror": True, ...}``.

    A bool key given without a value means true. Values stay strings; :func:`from_dict` converts them.
    """
    out: Dict[str, Any] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in _FIELDS and key not in _REPLACED:
            raise ConfigError(f"unknown config key {key!r}" + _suggest(key))
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            hint = _REPLACED[key][0] if key in _REPLACED else _HINTS[key]
            if hint is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"config {key}: missing value")
            else:
                value, i = nxt, i + 1
        out[key] = value
        i += 1
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: ...``, exit code 2 (like every other refused command)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False,
                     epilog="Every TrainConfig field (fastadvseg/config.py) is also an option --key value, applied after "
                            "--config:\n\n" + describe_options() +
                            f"\n\nShipped configs (--config NAME): {', '.join(shipped_configs())}.")
    parser.add_argument("--config", help="a YAML/JSON file or a shipped config name (e.g. voc_1_8)")
    return parser


def describe_options() -> str:
    """The options grouped as in TrainConfig, each with its type, default and the first sentence of its help."""
    lines, group = [], None
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(("\n" if lines else "") + f"{group}:")
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        summary = f.metadata["help"].split(". ")[0].rstrip(".")
        lines.append(f"{f'  --{f.name} {_metavar(_HINTS[f.name])}':<34} {summary} [default: {shown}]")
    return "\n".join(lines)


def load_config(config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                base: Optional[TrainConfig] = None) -> TrainConfig:
    """Defaults (or ``base``) <- the config file <- the overrides."""
    cfg = from_dict(read_config_file(config), base, validate=False) if config else (base or TrainConfig())
    return from_dict(overrides or {}, cfg)


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".json"):
            json.dump(cfg.to_dict(), f, indent=2)
        else:
            _yaml().safe_dump(cfg.to_dict(), f, sort_keys=False)
