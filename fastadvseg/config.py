"""The training configuration: ONE dataclass, loadable from YAML/JSON, every field overridable as ``--key value``.

Field defaults are the paper's PASCAL VOC recipe (Hung et al. 2018, section 4) EXCEPT those marked "synthetic
default": with no arguments, ``python -m fastadvseg.train`` trains the compact model FROM SCRATCH on the embedded
synthetic data in about 3 minutes on 2 CPU cores. Besides sizes (crop, batch, steps, semi_start, ndf), training from
scratch changes three optimisation settings that the paper tuned for fine-tuning a COCO-pretrained ResNet-101:
lr 0.02 with no 10x head (measured on the synthetic task: 2.5e-4 learns nothing useful in 500 steps, a 10x head
halves the mIoU) and live BatchNorm (frozen BN of an untrained net is the identity). The shipped configs (``fastadvseg/configs/*.yaml``: ``voc_1_8`` ... ``cityscapes_1_4``)
restore the paper's settings; ``--config NAME`` picks one, ``--config path.yaml`` reads a file.
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

MODES = ("baseline", "adv", "semi")
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


@dataclass
class TrainConfig:
    # --- run ---
    name: Optional[str] = None  # run directory name under run_root (default: a timestamp)
    seed: int = 1234  # model init, batch order and augmentation all derive from it
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    # --- data ---
    dataset: str = "synthetic"  # "synthetic" (embedded, no download), "voc", "cityscapes", "folder"
    data_root: Optional[str] = None  # the dataset's folder (not needed for synthetic)
    # resize every train and val item to (h, w) first (image bilinear, label nearest); paper Cityscapes: 512x1024
    image_size: Optional[Tuple[int, int]] = None
    crop_size: Tuple[int, int] = (64, 64)  # training crop (h, w); synthetic default; paper VOC: 321x321
    scale_range: Tuple[float, float] = (0.5, 1.5)  # random scale of training items (low, high)
    mirror: bool = True  # random horizontal flip of training items
    labelled_fraction: float = 0.125  # 1/8, 1/4, 1/2 or 1 of the training ids
    labelled_count: Optional[int] = None  # an absolute count instead of the fraction
    split_seed: int = 0  # the labelled/unlabelled split is drawn with this seed and saved with the run
    split_file: Optional[str] = None  # reuse a saved split (a run's split.json)
    val_pad: Optional[int] = None  # pad val images to N x N so they batch; VOC protocol: 505
    val_limit: Optional[int] = 96  # evaluate on the first N val images (None: all); synthetic default
    num_workers: int = 0  # DataLoader worker processes
    # --- model ---
    model: str = "deeplabv2_compact"  # the segmenter (fastadvseg.models.SEGMENTERS); synthetic default; paper: deeplabv2_resnet101
    pretrained: Optional[str] = None  # local weights file (torchvision ImageNet or the authors' COCO layout)
    # the segmenter's start: "scratch" (random init) or "pretrained" (--pretrained FILE, else, for deeplabv2_compact,
    # the backbone shipped in the package: pretrained on a disjoint synthetic task by python -m fastadvseg.pretrain,
    # no download); none: pretrained exactly when --pretrained is given
    init: Optional[str] = None
    pretrained_d: Optional[str] = None  # local discriminator state_dict
    freeze_bn: bool = False  # freeze BatchNorm (statistics and affine); synthetic default (from scratch); paper: true
    # bottleneck stride on the 1x1 conv (authors' DeepLab/Caffe layout) or the 3x3 (torchvision); None: as the
    # pretrained file's layout says (1x1 without a file). The run's config.yaml records the resolved value.
    stride_in_1x1: Optional[bool] = None
    # feed the net Caffe input (BGR, 0..255, Caffe mean subtracted), as the authors' Caffe-trained COCO weights
    # expect; None: true exactly for the DeepLab/COCO weights layout. Recorded resolved in the run's config.yaml.
    caffe_input: Optional[bool] = None
    ndf: int = 32  # discriminator width; synthetic default; paper: 64
    # --- losses ---
    mode: str = "semi"  # baseline (L_ce), adv (+L_adv), semi (+L_adv on unlabelled + L_semi)
    lambda_adv: float = 0.01  # weight of L_adv on labelled images
    lambda_semi: float = 0.1  # weight of L_semi (pseudo-labels where D is confident)
    lambda_semi_adv: float = 0.001  # weight of L_adv on unlabelled images
    semi_threshold: float = 0.2  # T_semi: L_semi keeps pixels where sigmoid(D) > T_semi
    d_unlabelled: bool = True  # D also sees the unlabelled predictions as fake (the authors' D_remain)
    # a remedy for D's entropy shortcut, off by default (the paper's recipe): D's real input is the one-hot ground truth
    # smoothed to (1 - eps) one-hot + eps / C, so a low entropy alone no longer tells real from predicted maps
    d_real_smoothing: float = 0.0
    # the other remedy, off by default: D sees the (normalised) image beside the probability map (C + 3 input channels),
    # so it can judge a map against the image it segments, not only by its entropy
    d_image: bool = False
    # --- optimisation ---
    batch_size: int = 8  # global batch (split over DDP ranks); synthetic default; paper: 10
    lr: float = 0.02  # SGD learning rate of G; synthetic default; paper: 2.5e-4
    head_lr_mult: float = 1.0  # the classifier head's lr multiplier; synthetic default; paper: 10
    momentum: float = 0.9  # SGD momentum of G, in [0, 1)
    weight_decay: float = 5e-4  # SGD weight decay of G
    lr_d: float = 1e-4  # Adam learning rate of D
    betas_d: Tuple[float, float] = (0.9, 0.99)  # Adam betas of D, each in [0, 1)
    # --- schedule ---
    steps: int = 900  # training iterations; synthetic default; paper: 20000
    power: float = 0.9  # poly learning-rate decay: lr * (1 - step/steps)^power
    semi_start: int = 225  # first step of L_semi; synthetic default (1/4 of the steps, as the paper's 5000 of 20000)
    # --- speed ---
    # torch intra-op threads when training on the CPU (None: torch's default, one per core). 1 is the fastest for the
    # small default model on a shared 2-core machine: measured 5x faster than 2 threads when other jobs load the CPUs.
    num_threads: Optional[int] = 1
    amp: str = "none"  # "none", "bf16", "fp16" (fp16 uses a GradScaler on CUDA)
    channels_last: bool = False  # channels-last memory format for the nets
    loss_backend: str = "auto"  # auto, reference, cpu, triton, cuda
    # The memory allocator of the program's process (fastadvseg/utils/allocator.py). auto: a preloaded jemalloc or
    # tcmalloc, else steady; steady: glibc mallopt keeps freed buffers for reuse (no page faults every step);
    # jemalloc, tcmalloc: restart with that library preloaded; system: the C library's defaults. Set by the command
    # line programs for their own process; config.yaml records what the run used
    allocator: str = "auto"
    # --- output ---
    run_root: str = "runs"  # run directories are created under it
    log_every: int = 10  # print and record losses averaged over this many steps
    eval_every: int = 300  # validate every N steps (0: only at the end)
    checkpoint_every: int = 100  # write checkpoints/last.pt every N steps (0: only at the end)
    eval_batch_size: int = 8  # images per evaluation batch
    num_vis_images: int = 4  # val images shown in samples.png
    plots: bool = True  # write losses.png, miou.png, samples.png at the end
    # at the end, also score the final model on the held-out test split (synthetic: 200 images disjoint from train and
    # val); written to summary.json and eval_test.md, never used to choose anything (best.pt is chosen on val)
    eval_test: bool = False
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the optional tensorboard package)

    def validate(self) -> "TrainConfig":
        """Refuse values that cannot work (ConfigError naming the key), before anything is built or written."""
        def bad(key, msg):
            raise ConfigError(f"config {key}={getattr(self, key)!r}: {msg}")

        from .data import DATASETS
        from .models import SEGMENTERS

        for key, choices in (("model", SEGMENTERS), ("mode", MODES), ("amp", AMP_MODES),
                             ("loss_backend", LOSS_BACKENDS), ("dataset", DATASETS), ("allocator", ALLOCATORS)):
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
        if self.num_threads is not None and self.num_threads < 0:
            bad("num_threads", "must be >= 0 (or none: torch's default)")
        # numbers: a NaN or an infinity is never meaningful here
        for key in ("lr", "lr_d", "head_lr_mult"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                bad(key, "must be a finite number > 0")
        for key in ("weight_decay", "power", "lambda_adv", "lambda_semi", "lambda_semi_adv"):
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
        if not 0 <= self.semi_threshold <= 1:
            bad("semi_threshold", "must be in [0, 1]")
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
    for key, value in values.items():
        key = key.replace("-", "_")
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
        if key not in _FIELDS:
            raise ConfigError(f"unknown config key {key!r}" + _suggest(key))
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _HINTS[key] is bool and (nxt is None or nxt.startswith("--")):
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


def field_help() -> Dict[str, Tuple[str, str]]:
    """{field: (group, help)} from the comments of :class:`TrainConfig` (``# --- group ---`` headers, the comment
    lines above a field and the comment after it): the dataclass stays the one place that documents a setting."""
    import inspect
    import re

    try:
        lines = inspect.getsource(TrainConfig).splitlines()
    except (OSError, TypeError):  # no source (e.g. a frozen build): names, types and defaults only
        return {}
    out, group, above = {}, "", []
    for line in lines:
        text = line.strip()
        header = re.fullmatch(r"# --- (.+) ---", text)
        field = re.match(r"(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", text)
        if header:
            group, above = header.group(1), []
        elif text.startswith("#"):
            above.append(text.lstrip("# "))
        elif field and field.group(1) in _FIELDS:
            out[field.group(1)] = (group, " ".join(above + [field.group(2) or ""]).strip())
            above = []
    return out


def describe_options() -> str:
    """The options grouped as in TrainConfig, each with its type, default and one line of help."""
    helps = field_help()
    lines, group = [], None
    for f in dataclasses.fields(TrainConfig):
        g, text = helps.get(f.name, ("options", ""))
        if g != group:
            lines.append(("\n" if lines else "") + f"{g}:")
            group = g
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        opt = f"  --{f.name} {_metavar(_HINTS[f.name])}"
        lines.append(f"{opt:<34} {text.split('. ')[0].rstrip('.')} [default: {shown}]")
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
