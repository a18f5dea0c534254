"""Training a researcher can trust: one-line errors (exit 2, nothing written), checked checkpoints and resume
overrides, the stop on non-finite values, best.pt protection, data checked before the first step, one process per
run, faults (disk full, temp files, signals), the Cityscapes resize and what a user reads while a run goes.

Tiny synthetic runs (33x33 crops, a few steps, the reference loss backend): each test takes a few seconds on 2 cores.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastadvseg.train as train_mod
from fastadvseg import evaluate as evaluate_mod
from fastadvseg.config import ConfigError, load_config
from fastadvseg.utils import checkpoint as ckpt_mod
from fastadvseg.utils.log import read_metrics

Image = pytest.importorskip("PIL.Image")

TINY = dict(crop_size="33,33", batch_size=2, steps=3, val_limit=2, eval_batch_size=2, ndf=8, log_every=1,
            checkpoint_every=1, eval_every=0, plots=False, semi_start=1, loss_backend="reference", device="cpu",
            mode="adv")


def tiny(tmp_path, name="run", **kw):
    return load_config(None, {**TINY, "run_root": str(tmp_path), "name": name, **kw})


def argv(tmp_path, name="run", **kw):
    return [f"--{k}={v}" for k, v in {**TINY, "run_root": str(tmp_path), "name": name, **kw}.items()]


def last_state(run):
    """The run's checkpoints/last.pt as ``--resume`` reads it: found from the run directory, loaded with
    weights_only, a complete training state with finite weights (a CheckpointError otherwise)."""
    return ckpt_mod.read_training_state(ckpt_mod.resolve_checkpoint(str(run)))


def run_main(main, args, capsys):
    """(exit code, stderr) of a CLI main called in-process."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


def snapshot(root):
    """{relative path: bytes} of every file under root: "nothing changed on disk" is equality of two snapshots."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def assert_one_line_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ------------------------------------------------------------------------------------------ 1. one-line errors

@pytest.mark.parametrize("extra, fragment", [
    (["--lr", "-0.1"], "lr=-0.1"), (["--lr", "nan"], "lr=nan"), (["--lr_d", "inf"], "lr_d=inf"),
    (["--momentum", "1.5"], "momentum=1.5"), (["--betas_d", "0.9,1.0"], "betas_d"),
    (["--lambda_semi", "nan"], "lambda_semi"), (["--weight_decay", "-1"], "weight_decay"),
    (["--scale_range", "0,1"], "scale_range"), (["--steps", "many"], "steps"), (["--learning_rate", "1"], "steps"),
    (["--dataset", "folder"], "set --data_root"), (["--dataset", "folder", "--data_root", "/nonexistent/x"], "/nonexistent/x"),
    (["--config", "/nonexistent/c.yaml"], "c.yaml"), (["--pretrained", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run"), (["--config"], "--config"),
    (["--device", "gpu"], "device='gpu'"), (["--val_pad", "50"], "larger than val_pad=50"),
    (["--labelled_count", "5000"], "labelled_count"), (["--split_file", "/nonexistent/s.json"], "s.json"),
    (["--ignore_index", "256"], "ignore_index=256: must be a mask value in 0..255"),
    (["--ignore_index", "-1"], "ignore_index=-1"), (["--ignore_index", "x"], "ignore_index: cannot use 'x' as int"),
    (["--ignore_index", "7"], "ignore_index=7: that is a class of dataset synthetic (class ids 0..7)"),
    (["--batchnorm", "eval"], "batchnorm='eval': choose one of ('live', 'frozen_affine', 'frozen')"),
    (["--freeze_bn", "maybe"], "freeze_bn: cannot use 'maybe' as bool"),
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, extra, fragment):
    if extra == ["--learning_rate", "1"]:
        fragment = "learning_rate"
    code, err = run_main(train_mod.main, argv(tmp_path) + extra, capsys)
    assert_one_line_error(code, err, fragment)
    assert os.listdir(tmp_path) == []  # no run directory, nothing else


def test_config_files_that_do_not_parse_name_the_file_and_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: 3\nmode: [semi\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"steps": 3,\n "mode": }')
    for path, kind in ((bad_yaml, "YAML"), (bad_json, "JSON")):
        code, err = run_main(train_mod.main, ["--config", str(path), "--run_root", str(tmp_path / "runs")], capsys)
        assert_one_line_error(code, err, str(path), kind, "line")
    assert not (tmp_path / "runs").exists()


def test_damaged_pretrained_weights_are_named(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"PK\x03\x04 not really")
    code, err = run_main(train_mod.main, argv(tmp_path / "runs") + ["--pretrained", str(weights)], capsys)
    assert_one_line_error(code, err, str(weights))
    assert "weights_only=False" not in err and not (tmp_path / "runs").exists()


# The library installs torch and numpy only; the pipeline's own needs come with the "train" extra. Run in a fresh
# interpreter in which pyyaml, matplotlib and pillow cannot be imported.
_WITHOUT_TRAIN_EXTRA = """
import sys
for m in ("yaml", "matplotlib", "PIL"):
    sys.modules[m] = None
"""


def test_the_losses_need_no_train_extra(tmp_path):
    code = _WITHOUT_TRAIN_EXTRA + """
import torch, fastadvseg as fas
from fastadvseg import nn, models
x = torch.randn(2, 3, 5, 7, requires_grad=True)
fas.generator_loss(x, torch.randn(2, 1, 5, 7), torch.randint(0, 3, (2, 5, 7)), lambda_adv=0.01).total.backward()
assert x.grad is not None and bool(torch.isfinite(x.grad).all())
print(type(models.FCDiscriminator(3)(torch.randn(1, 3, 64, 64))).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "Tensor", out.stderr


@pytest.mark.parametrize("program", ["fastadvseg.train", "fastadvseg.evaluate", "fastadvseg.experiments.table"])
def test_the_pipeline_without_its_train_extra_says_what_to_install(tmp_path, program):
    run = _WITHOUT_TRAIN_EXTRA + f"""
import runpy
sys.argv = ["{program}"] + sys.argv[1:]
runpy.run_module("{program}", run_name="__main__")
"""
    out = subprocess.run([sys.executable, "-c", run, "--run_root", str(tmp_path), "--run", str(tmp_path),
                          "--out", str(tmp_path / "table")], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line_error(out.returncode, out.stderr, f"python -m {program} needs", "missing here: pyyaml, matplotlib, "
                          "pillow", "pip install 'fastadvseg[train]'")
    assert os.listdir(tmp_path) == []
    helps = subprocess.run([sys.executable, "-c", run, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helps.returncode == 0 and helps.stdout.startswith(f"usage: python -m {program} "), helps.stdout[:200]


# ------------------------------------------------------------------------------------------ 2. checkpoints

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run (never modified by the tests: they copy it)."""
    root = tmp_path_factory.mktemp("finished")
    out = train_mod.train(tiny(root, "done", eval_every=1))
    return out["run_dir"]


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "random bytes": lambda b: os.urandom(4096),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_on_resume_is_named_and_changes_nothing(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path / "run")
    last = os.path.join(run, "checkpoints", "last.pt")
    with open(last, "rb") as f:
        data = f.read()
    with open(last, "wb") as f:
        f.write(DAMAGE[damage](data))
    before = snapshot(run)
    code, err = run_main(train_mod.main, ["--resume", run, "--steps", "5"], capsys)
    assert_one_line_error(code, err, last, "damaged", "its best.pt may be usable")
    assert "weights_only" not in err and snapshot(run) == before


def test_bare_state_dict_and_non_finite_checkpoint_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    last = os.path.join(run, "checkpoints", "last.pt")
    state = torch.load(last, weights_only=True)
    torch.save(state["G"], last)
    code, err = run_main(train_mod.main, ["--resume", run], capsys)
    assert_one_line_error(code, err, last, "no training state", "bare state_dict")
    state["G"][next(iter(state["G"]))].fill_(float("nan"))
    torch.save(state, last)
    code, err = run_main(train_mod.main, ["--resume", run], capsys)
    assert_one_line_error(code, err, last, "non-finite")


@pytest.mark.parametrize("override, fragment", [
    (["--ndf", "16"], "ndf 8 -> 16"), (["--model", "deeplabv2_resnet18"], "model"),
    (["--lr", "0.001"], "lr 0.02 -> 0.001"), (["--mode", "semi"], "mode"),
    (["--steps", "2"], "already at step 3"), (["--batchnorm", "frozen"], "batchnorm 'live' -> 'frozen'"),
    (["--ignore_index", "254"], "ignore_index 255 -> 254"),
])
def test_resume_refuses_overrides_that_change_what_the_checkpoint_means(finished, tmp_path, capsys, override,
                                                                       fragment):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, err = run_main(train_mod.main, ["--resume", run] + override, capsys)
    assert_one_line_error(code, err, fragment)
    assert snapshot(run) == before


def test_resume_accepts_and_records_harmless_overrides(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    code, _ = run_main(train_mod.main, ["--resume", run, "--steps", "5", "--eval_every", "2", "--log_every", "2",
                                        "--num_workers", "0", "--checkpoint_every", "2"], capsys)
    assert code == 0
    records = read_metrics(os.path.join(run, "metrics.jsonl"))
    resume = [r for r in records if r["kind"] == "resume"]
    assert resume == [{"kind": "resume", "step": 3, "changed": {"steps": [3, 5], "log_every": [1, 2],
                                                                  "eval_every": [1, 2], "checkpoint_every": [1, 2]}}]
    cfg = load_config(os.path.join(run, "config.yaml"))
    summary = json.load(open(os.path.join(run, "summary.json")))
    state = last_state(run)
    assert cfg.steps == summary["step"] == state["step"] == state["config"]["steps"] == 5  # the files agree


def test_resuming_a_finished_run_keeps_its_files_in_agreement(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    code, err = run_main(train_mod.main, ["--resume", run, "--steps", "2"], capsys)  # the 60 -> 40
    assert_one_line_error(code, err, "already at step 3")
    assert code == 2
    assert run_main(train_mod.main, ["--resume", run], capsys)[0] == 0  # same steps: just reports
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["step"] == load_config(os.path.join(run, "config.yaml")).steps == \
        last_state(run)["step"] == 3


def test_checkpoint_of_another_configuration_copied_into_a_run_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "a")
    other = train_mod.train(tiny(tmp_path, "b", ndf=16, steps=1))
    import shutil

    shutil.copy(os.path.join(other["run_dir"], "checkpoints", "last.pt"), os.path.join(run, "checkpoints", "last.pt"))
    before = snapshot(run)
    code, err = run_main(train_mod.main, ["--resume", run, "--steps", "4"], capsys)
    assert_one_line_error(code, err, "not of the run", "ndf 16 (config.yaml: 8)")
    assert snapshot(run) == before  # config.yaml not rewritten, metrics.jsonl not cut


def test_a_run_of_the_earlier_settings_resumes_with_the_same_meaning(finished, tmp_path, capsys):
    """A run saved when BatchNorm was set by freeze_bn, and before ignore_index existed, continues: its checkpoint
    and config.yaml read as batchnorm live (freeze_bn false) and ignore_index 255; the files then use the new keys."""
    import yaml

    run = copy_run(finished, tmp_path / "run")
    last, config_yaml = os.path.join(run, "checkpoints", "last.pt"), os.path.join(run, "config.yaml")

    def earlier(config):
        config = {k: v for k, v in config.items() if k != "ignore_index"}
        config["freeze_bn"] = config.pop("batchnorm") == "frozen"
        return config

    state = torch.load(last, weights_only=True)
    state["config"] = earlier(state["config"])
    torch.save(state, last)
    with open(config_yaml, encoding="utf-8") as f:
        old_yaml = earlier(yaml.safe_load(f))
    with open(config_yaml, "w", encoding="utf-8") as f:
        yaml.safe_dump(old_yaml, f)
    code, err = run_main(train_mod.main, ["--resume", run, "--steps", "4"], capsys)
    assert code == 0, err
    state = last_state(run)
    with open(config_yaml, encoding="utf-8") as f:
        new_yaml = yaml.safe_load(f)
    assert state["step"] == 4 and "freeze_bn" not in new_yaml and "freeze_bn" not in state["config"]
    assert new_yaml["batchnorm"] == state["config"]["batchnorm"] == "live" and new_yaml["ignore_index"] == 255
    code, err = run_main(train_mod.main, ["--resume", run, "--steps", "5", "--freeze_bn", "true"], capsys)
    assert_one_line_error(code, err, "batchnorm 'live' -> 'frozen'")


def test_checkpoint_of_other_classes_is_refused(finished, tmp_path):
    state = last_state(finished)
    with pytest.raises(ckpt_mod.CheckpointError, match="trained on 8 classes, the data now have 3"):
        ckpt_mod.check_data_fits(state, ["a", "b", "c"], "x.pt")


def test_evaluate_falls_back_from_a_damaged_best_and_says_which(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    best = os.path.join(run, "checkpoints", "best.pt")
    with open(best, "r+b") as f:
        f.truncate(100)
    code = evaluate_mod.main(["--run", run, "--out", str(tmp_path / "ev")])
    captured = capsys.readouterr()
    assert code == 0
    assert f"checkpoint {best} is damaged" in captured.err
    assert f"evaluating checkpoint {os.path.join(run, 'checkpoints', 'last.pt')} (step 3" in captured.out
    os.remove(best)
    os.remove(os.path.join(run, "checkpoints", "last.pt"))
    code, err = run_main(evaluate_mod.main, ["--run", run], capsys)
    assert_one_line_error(code, err, "has no checkpoints")
    code, err = run_main(evaluate_mod.main, ["--run", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "not a run directory")


# ------------------------------------------------------------------------------------------ 3. non-finite values

def _poison(monkeypatch, at_step, key="loss_ce", weights=False):
    real = train_mod.train_step

    def step(cfg, nets, s, *a, **k):
        out = real(cfg, nets, s, *a, **k)
        if s == at_step:
            if weights:  # the losses of this step are fine, but the weights are not
                with torch.no_grad():
                    next(nets.G.parameters()).fill_(float("inf"))
            else:
                out[key] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(train_mod, "train_step", step)


@pytest.mark.parametrize("key", ["loss_ce", "grad_norm_g", "loss_d"])
def test_first_non_finite_value_stops_the_run_naming_step_and_term(tmp_path, monkeypatch, capsys, key):
    _poison(monkeypatch, 2, key)
    code = train_mod.main(argv(tmp_path, steps=6))
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and f"error: step 3: {key} is nan" in err
    state = last_state(str(tmp_path / "run"))
    assert state["step"] == 2 and ckpt_mod.first_non_finite({"G": state["G"], "D": state["D"]}) is None
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert records[-1] == {"kind": "stopped", "step": 3, "reason": f"{key} is nan"}
    assert not (tmp_path / "run" / "summary.json").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    _poison(monkeypatch, 1, weights=True)
    with pytest.raises(train_mod.RunStopped, match="step 2: weight G.* is not finite"):
        train_mod.train(tiny(tmp_path, steps=6))
    assert last_state(str(tmp_path / "run"))["step"] == 1


def test_best_is_never_replaced_by_a_worse_or_broken_model(tmp_path, monkeypatch):
    from fastadvseg.metrics import SegMetrics

    scores = iter([0.5, 0.3, float("nan"), 0.4, 0.45])
    real = train_mod.evaluate

    def fake_evaluate(*a, **k):
        r = real(*a, **k)
        return SegMetrics(**{**r.__dict__, "miou": next(scores)}) if hasattr(r, "__dict__") else r

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    out = train_mod.train(tiny(tmp_path, steps=3, eval_every=1))
    best = os.path.join(out["run_dir"], "checkpoints", "best.pt")
    assert torch.load(best, weights_only=True)["step"] == 1 and ckpt_mod.recorded_miou(best) == 0.5
    # a resume from a checkpoint that lost track of the best (e.g. an older one) still never replaces best.pt
    last = os.path.join(out["run_dir"], "checkpoints", "last.pt")
    state = torch.load(last, weights_only=True)
    state["best_miou"] = None
    torch.save(state, last)
    train_mod.train(*train_mod.parse_cli(["--resume", out["run_dir"], "--steps", "5"]))
    assert torch.load(best, weights_only=True)["step"] == 1


# ------------------------------------------------------------------------------------------ 4. data checks

H, W = 40, 48


def folder_dataset(root, n=6, classes=3, bad=None):
    """images/ + masks/ (+ classes.txt); ``bad`` = (id, kind) breaks one item."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"i{k}.png")
        Image.fromarray(rng.integers(0, classes, (H, W)).astype(np.uint8)).save(root / "masks" / f"i{k}.png")
    if classes:
        (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(classes)))
    (root / "val.txt").write_text("i0\ni1\n")
    return root


@pytest.mark.parametrize("item, kind, fragment", [
    ("i3", "value", "has value(s) [5]"), ("i4", "size", "is 40x50 but its image"),
    ("i2", "corrupt", "cannot read image file"), ("i1", "value", "has value(s) [5]"),  # i1 is a val item
    ("i5", "missing", "mask file not found"),
])
def test_bad_data_is_found_before_the_first_step_naming_the_file(tmp_path, capsys, item, kind, fragment):
    root = folder_dataset(tmp_path / "data")
    mask, image = root / "masks" / f"{item}.png", root / "images" / f"{item}.png"
    if kind == "value":
        arr = np.zeros((H, W), np.uint8)
        arr[3, 4] = 5
        Image.fromarray(arr).save(mask)
    elif kind == "size":
        Image.fromarray(np.zeros((H, W + 2), np.uint8)).save(mask)
    elif kind == "corrupt":
        image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    else:
        mask.unlink()
    code, err = run_main(train_mod.main, argv(tmp_path / "runs", dataset="folder", data_root=str(root)), capsys)
    assert_one_line_error(code, err, fragment, str(image if kind == "corrupt" else mask))
    assert not (tmp_path / "runs").exists()


def test_masks_with_their_own_ignore_value_train_and_score_with_ignore_index(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", classes=3)
    for mask in (root / "masks").iterdir():  # a band of 5 rows marked 250, the masks' own ignore value
        arr = np.array(Image.open(mask))
        arr[:5] = 250
        Image.fromarray(arr).save(mask)
    code, err = run_main(train_mod.main, argv(tmp_path / "runs", dataset="folder", data_root=str(root)), capsys)
    assert_one_line_error(code, err, "has value(s) [250]", "255 = ignore")
    code, err = run_main(train_mod.main, argv(tmp_path / "runs", dataset="folder", data_root=str(root),
                                              ignore_index=250), capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "run"
    assert load_config(str(run / "config.yaml")).ignore_index == last_state(run)["config"]["ignore_index"] == 250
    report = json.load(open(run / "eval.json"))
    assert report["num_pixels"] == 2 * (H - 5) * W  # the two val images without their ignore band
    assert all(np.isfinite(r["loss_d"]) for r in read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "train")


def test_inferred_class_count_refuses_implausible_values_naming_the_file(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", classes=3)
    (root / "classes.txt").unlink()
    Image.fromarray(np.full((H, W), 60000, np.uint16)).save(root / "masks" / "i3.png")
    code, err = run_main(train_mod.main, argv(tmp_path / "runs", dataset="folder", data_root=str(root)), capsys)
    assert_one_line_error(code, err, str(root / "masks" / "i3.png"), "60000", "values found: 0, 1, 2, 60000")


def test_data_check_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    from fastadvseg.data import build_data
    from fastadvseg.data import check

    root = folder_dataset(tmp_path / "data")
    bundle = build_data("folder", str(root), crop_size=33, labelled_fraction=0.5)
    check.check_bundle(bundle, log=lambda *a: None)
    assert (root / check.CACHE_FILE).is_file()
    check._MEMO.clear()  # a new process: only the cache file remains
    reads = []
    real_load = type(bundle.val.source).load
    monkeypatch.setattr(type(bundle.val.source), "load", lambda self, i: reads.append(i) or real_load(self, i))
    check.check_bundle(bundle, log=lambda *a: None)
    assert reads == []  # nothing read again
    os.utime(root / "masks" / "i3.png", ns=(1, 1))  # a changed file is read again
    check.check_bundle(bundle, log=lambda *a: None)
    assert reads == ["i3"]


# ------------------------------------------------------------------------------------------ 5, 6. lock, faults

def test_a_second_process_on_a_run_directory_is_refused(finished, tmp_path, capsys):
    from fastadvseg.utils.lock import RunLock

    run = copy_run(finished, tmp_path / "run")
    with RunLock(run).acquire():  # held as a running trainer holds it
        code, err = run_main(train_mod.main, ["--resume", run, "--steps", "4"], capsys)
        assert_one_line_error(code, err, "in use by another process", f"pid {os.getpid()}")
        code, err = run_main(train_mod.main, argv(tmp_path, "run"), capsys)  # a new run of the same --name
        assert_one_line_error(code, err, "in use by another process")
    assert run_main(train_mod.main, ["--resume", run, "--steps", "4"], capsys)[0] == 0  # released: fine again


def test_disk_full_while_saving_is_one_error_naming_the_path(tmp_path, monkeypatch, capsys):
    import errno

    real_save, calls = torch.save, []

    def full_after_two(obj, f, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            f.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_after_two)
    code = train_mod.main(argv(tmp_path, steps=5))
    err = capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert code == 3 and err.count("\n") == 1 and f"cannot write checkpoint {last}: No space left on device" in err
    monkeypatch.undo()
    assert last_state(str(tmp_path / "run"))["step"] == 2  # the previous one, usable
    assert sorted(os.listdir(last.parent)) == ["last.pt"]


def test_leftover_temp_files_are_removed_at_start(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    stale = [os.path.join(run, "checkpoints", ".last.pt.abc123.tmp"), os.path.join(run, "metrics.jsonl.tmp")]
    for p in stale:
        open(p, "wb").write(b"torn")
    assert train_mod.main(["--resume", run, "--steps", "4"]) == 0
    assert "removed" in capsys.readouterr().out and not any(os.path.exists(p) for p in stale)


def test_sigterm_exits_143_after_saving_and_a_second_process_is_refused_meanwhile(tmp_path):
    args = [sys.executable, "-m", "fastadvseg.train"] + argv(tmp_path, "sig", steps=500, checkpoint_every=0,
                                                             log_every=1)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/500"):
                break
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 143, rest
    finally:
        proc.kill()
    assert second.returncode == 2 and second.stderr.startswith("error: ") and "in use" in second.stderr
    assert second.stderr.count("\n") == 1
    assert "SIGTERM: finishing this step" in rest
    assert last_state(str(tmp_path / "sig"))["step"] >= 2


# ------------------------------------------------------------------------------------------ 7. Cityscapes

def cityscapes_tree(root, h=44, w=88):
    label = np.zeros((h, w), np.uint8)
    label[:, : w // 2] = 7  # road -> 0
    label[:, w // 2:] = 26  # car -> 13
    label[: h // 4] = 0  # unlabelled -> 255
    rng = np.random.default_rng(0)
    for split, city in (("train", "aachen"), ("train", "bonn"), ("val", "lindau")):
        for k in range(2):
            stem = f"{city}_000000_00001{k}"
            for sub, suffix, arr in (("leftImg8bit", "leftImg8bit", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                                     ("gtFine", "gtFine_labelIds", label)):
                d = root / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(d / f"{stem}_{suffix}.png")
    return root


def test_cityscapes_recipe_resizes_images_and_labels_for_training_and_evaluation(tmp_path):
    for name in ("cityscapes_1_8", "cityscapes_1_4"):
        cfg = load_config(name)
        assert cfg.image_size == (512, 1024) == cfg.crop_size and cfg.scale_range == (1.0, 1.0)
    root = cityscapes_tree(tmp_path / "cs")
    cfg = tiny(tmp_path / "runs", dataset="cityscapes", data_root=str(root), image_size="36,72", crop_size="36,72",
               scale_range="1,1", mirror=False, labelled_fraction=0.5, val_limit=None)
    from fastadvseg.utils.builders import build_bundle

    bundle = build_bundle(cfg)
    for ds in (bundle.labelled, bundle.unlabelled, bundle.val):
        x, y, _ = ds[0]
        assert x.shape == (3, 36, 72) and y.shape == (36, 72)
        assert set(y.unique().tolist()) == {0, 13, 255}  # nearest neighbour: no blended class ids
        assert (y[:, :36] != 13).all() and (y[:, 36:] != 0).all() and (y[:9] == 255).all()
    out = train_mod.train(cfg)
    report = json.load(open(os.path.join(out["run_dir"], "eval.json")))
    assert report["num_pixels"] == 2 * 36 * 72 - 2 * 9 * 72  # scored at 36x72, ignore rows excluded


# ------------------------------------------------------------------------------------------ 8. readable

@pytest.mark.parametrize("program", ["train", "evaluate"])
def test_help_groups_options_with_type_default_and_meaning(capsys, program):
    import dataclasses

    from fastadvseg.config import TrainConfig

    with pytest.raises(SystemExit) as e:
        train_mod.parse_cli(["--help"]) if program == "train" else evaluate_mod.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    groups = [g for g in ("run:", "data:", "model:", "losses:", "optimisation:", "schedule:", "speed:", "output:")
              if f"\n{g}\n" in text]
    assert len(groups) == 8, groups
    lr = next(line for line in text.splitlines() if line.strip().startswith("--lr "))
    assert "FLOAT" in lr and "SGD learning rate of G; synthetic default; paper: 2.5e-4" in lr and "[default: 0.02]" in lr
    # every setting is listed once, under its group, with the first sentence of its own help and its default
    listed, group = {}, None
    for line in text.split("Every TrainConfig field")[1].splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group = line[:-1]
        elif line.startswith("  --"):
            listed[line.split()[0][2:]] = (group, line)
    assert list(listed) == [f.name for f in dataclasses.fields(TrainConfig)]
    for f in dataclasses.fields(TrainConfig):
        group, line = listed[f.name]
        summary = f.metadata["help"].split(". ")[0].rstrip(".")
        assert group == f.metadata["group"] and len(summary) > 10, f.name
        assert f"{summary} [default: " in line and line.endswith("]"), line
    assert "BatchNorm of the segmenter in training: live (batch statistics, learnt scale and shift" in \
        listed["batchnorm"][1] and "the voc_* configs" in listed["batchnorm"][1]


def test_log_lines_and_metrics_show_losses_averaged_over_the_window(tmp_path, monkeypatch, capsys):
    real, seen = train_mod.train_step, []

    def step(cfg, nets, s, *a, **k):
        out = real(cfg, nets, s, *a, **k)
        seen.append(float(out["loss_ce"]))
        return out

    monkeypatch.setattr(train_mod, "train_step", step)
    out = train_mod.train(tiny(tmp_path, steps=7, log_every=3))
    train = [r for r in read_metrics(os.path.join(out["run_dir"], "metrics.jsonl")) if r["kind"] == "train"]
    assert [(r["step"], r["window"]) for r in train] == [(1, 1), (3, 2), (6, 3), (7, 1)]
    assert train[2]["loss_ce"] == pytest.approx(sum(seen[3:6]) / 3)
    assert "(mean of 3)" in capsys.readouterr().out


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import importlib.util
    import types

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            tiny(tmp_path, tensorboard=True)
    # with the package (a stand-in here): the metrics.jsonl records become scalars
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            os.makedirs(log_dir)

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append("closed")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard"
                        else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    out = train_mod.train(tiny(tmp_path, tensorboard=True, steps=2))
    assert os.path.isdir(os.path.join(out["run_dir"], "tensorboard"))
    assert ("train/loss_ce", 1) in scalars and ("val/miou", 2) in scalars and scalars[-1] == "closed"


def test_plots_are_readable():
    import matplotlib.pyplot as plt

    from fastadvseg.data.synthetic import CLASS_NAMES, PALETTE
    from fastadvseg.utils.plots import loss_figure, miou_figure, samples_figure

    records = [{"kind": "train", "step": s, "window": 10, "loss_ce": 2.0 / s, "loss_d": 0.7} for s in range(10, 210, 10)]
    records += [{"kind": "val", "step": 100, "miou": 0.3012}, {"kind": "val", "step": 200, "miou": 0.3019}]
    fig = loss_figure(records)
    for ax in fig.axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_title()
        assert len(ax.lines) == 2  # the window means and their running mean
    assert "mean of 10 steps" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig = miou_figure(records)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0, 100) and ax.get_ylabel() == "val mIoU (%)"  # a 0.07-point change looks small
    labels = torch.zeros(2, 40, 40, dtype=torch.long)
    labels[:, 10:20, 10:20] = 3
    labels[:, 0] = 255
    conf = torch.linspace(0, 1, 1600).view(40, 40).expand(2, 40, 40)
    fig = samples_figure(torch.zeros(2, 3, 40, 40), labels, labels.clamp(max=7), conf, PALETTE, (0.5,) * 3,
                         (0.2,) * 3, CLASS_NAMES, threshold=0.2, titles=["a", "b"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["background", "triangle", "crescent", "ignore (255)"]  # the classes shown, by name
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and all(any(abs(line.get_ydata()[0] - 0.2) < 1e-9 for line in b.lines) for b in bars)
    assert "T_semi=0.2" in fig.axes[3].get_title()
    plt.close("all")


def test_a_failing_write_of_another_run_file_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    import errno

    from fastadvseg.utils import log as log_mod

    real = log_mod.MetricsLog.write

    def write(self, record):
        if record.get("step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return real(self, record)

    monkeypatch.setattr(log_mod.MetricsLog, "write", write)
    code = train_mod.main(argv(tmp_path, steps=4))
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1
    assert f"error: cannot write {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device" in err


def test_a_finished_run_given_more_steps_is_no_longer_marked_finished(finished, tmp_path, monkeypatch):
    from test_train import _interrupt_at

    run = copy_run(finished, tmp_path / "run")
    _interrupt_at(monkeypatch, 3)
    out = train_mod.train(*train_mod.parse_cli(["--resume", run, "--steps", "6"]))
    assert out["interrupted"] and out["signal"] == signal.SIGTERM
    assert not os.path.exists(os.path.join(run, "summary.json"))  # summary.json marks a finished run
    assert last_state(run)["step"] == 4 and load_config(os.path.join(run, "config.yaml")).steps == 6


def test_a_checkpoint_with_unsafe_objects_is_refused_without_loading_it(finished, tmp_path, capsys):
    import argparse

    run = copy_run(finished, tmp_path / "run")
    last = os.path.join(run, "checkpoints", "last.pt")
    state = torch.load(last, weights_only=True)
    state["extra"] = argparse.Namespace(a=1)
    torch.save(state, last)
    code, err = run_main(train_mod.main, ["--resume", run], capsys)
    assert_one_line_error(code, err, last, "cannot be loaded safely", "argparse.Namespace")
    assert "weights_only=False" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_resumes_on_the_cpu_with_device_cpu(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    last = os.path.join(run, "checkpoints", "last.pt")
    state = torch.load(last, weights_only=True)
    state["config"]["device"] = "cuda"
    torch.save(state, last)
    code, err = run_main(train_mod.main, ["--resume", run, "--steps", "4"], capsys)
    assert_one_line_error(code, err, "device='cuda'", "--device cpu")
    assert run_main(train_mod.main, ["--resume", run, "--steps", "4", "--device", "cpu"], capsys)[0] == 0


def test_val_images_larger_than_val_pad_are_found_before_training(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data")
    code, err = run_main(train_mod.main, argv(tmp_path / "runs", dataset="folder", data_root=str(root), val_pad=40),
                         capsys)
    assert_one_line_error(code, err, str(root / "images" / "i0.png"), "40x48, larger than val_pad=40", "--val_pad 48")
    assert not (tmp_path / "runs").exists()
