"""The memory allocator: the programs set it for their own process and say so (first log line, config.yaml); the
library (``import fastadvseg``, its losses) changes no process-wide setting. fastadvseg/utils/allocator.py."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fastadvseg.config import ALLOCATORS, load_config
from fastadvseg.utils import allocator

ROOT = Path(__file__).resolve().parents[1]
GLIBC = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's (Linux)")
TINY_RUN = ["--crop_size", "33,33", "--batch_size", "2", "--steps", "1", "--val_limit", "2", "--eval_batch_size", "2",
            "--ndf", "8", "--eval_every", "0", "--plots", "false", "--num_vis_images", "1", "--device", "cpu"]

# malloc, touch, free and malloc again 64 MiB (above the 32 MiB cap of glibc's dynamic mmap threshold: with the
# defaults it is unmapped when freed and faulted in again) straight from the C library, and print the minor faults
# of the second allocation: 16 385 with glibc's defaults, ~0 once the thresholds are raised. (Not a torch tensor:
# glibc's memalign does not reuse a freed chunk of exactly the size asked for, so that would need many rounds.)
PROBE = textwrap.dedent("""
    import ctypes, os, resource, sys, torch
    before = dict(os.environ)
    {setup}
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        f0 = faults()
        p = libc.malloc(64 << 20)
        ctypes.memset(p, 1, 64 << 20)
        n = faults() - f0
        libc.free(p)
    from fastadvseg.utils import allocator
    changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
    print(n, allocator.in_effect().name, ",".join(changed) or "-")
""")


def _probe(setup: str):
    env = allocator.plain_env()
    for key in allocator.environment_settings(env):
        del env[key]
    proc = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults, name, changed = proc.stdout.split()
    return int(faults), name, changed


@GLIBC
def test_import_and_losses_change_no_process_setting():
    """After ``import fastadvseg`` and a fused loss's forward and backward, glibc still unmaps a freed 64 MiB
    buffer (its second allocation faults it in again: mallopt untouched) and the environment is unchanged; the
    control with allocator.set_steady() shows that the probe sees the setting."""
    use_library = """
import fastadvseg as fas
x = torch.randn(2, 5, 17, 23, requires_grad=True)
z = torch.randn(2, 1, 17, 23, requires_grad=True)
fas.generator_loss(x, z, torch.randint(0, 5, (2, 17, 23)), lambda_adv=0.01).total.backward()
"""
    faults, name, changed = _probe(use_library)
    assert faults > 12000, faults  # 16384 pages of 4 KiB: every one faulted in again
    assert (name, changed) == ("system", "-")
    faults, name, _ = _probe(use_library + "from fastadvseg.utils.allocator import set_steady; set_steady()")
    assert faults < 1000 and name == "system", faults  # the control: reused (in_effect knows only configure())


def _train(tmp_path, *extra):
    proc = subprocess.run([sys.executable, "-m", "fastadvseg.train", "--run_root", str(tmp_path), "--name", "run",
                           *TINY_RUN, *extra], cwd=ROOT, env=allocator.plain_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    return proc.stdout.splitlines(), yaml.safe_load((run / "config.yaml").read_text()), run


@GLIBC
def test_train_names_the_allocator_first_and_in_config_yaml(tmp_path):
    """``python -m fastadvseg.train``: by default steady (glibc mallopt), said in the first line and recorded in
    config.yaml; ``python -m fastadvseg.evaluate`` on the run uses the recorded one and says so first too."""
    lines, config, run = _train(tmp_path)
    assert lines[0].startswith("allocator: steady (glibc mallopt"), lines[:3]
    assert "--allocator system" in lines[0]
    assert config["allocator"] == "steady"
    proc = subprocess.run([sys.executable, "-m", "fastadvseg.evaluate", "--run", str(run)], cwd=ROOT,
                          env=allocator.plain_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("allocator: steady"), proc.stdout[:500]


def test_train_allocator_system_leaves_the_defaults(tmp_path):
    lines, config, _ = _train(tmp_path, "--allocator", "system")
    assert lines[0] == "allocator: system (the C library's defaults)", lines[:3]
    assert config["allocator"] == "system"


def test_train_as_a_function_records_what_the_process_has(tmp_path, capsys):
    """Called in-process (not as the program) train leaves the process as it is: the first line and config.yaml
    say what is in effect."""
    import fastadvseg.train as train_mod

    assert train_mod.main(["--run_root", str(tmp_path), "--name", "fn", *TINY_RUN, "--loss_backend", "reference"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    name = allocator.in_effect().name
    assert first == allocator.in_effect().log_line() and first.startswith(f"allocator: {name}")
    assert yaml.safe_load((tmp_path / "fn" / "config.yaml").read_text())["allocator"] == name


def test_config_key_choices_and_resume():
    assert load_config(None, {"allocator": "system"}).allocator == "system"
    with pytest.raises(Exception, match="allocator"):
        load_config(None, {"allocator": "mimalloc"})
    assert ALLOCATORS == allocator.CHOICES
    from benchmarks.report import ALLOCATOR_CHOICES

    assert ALLOCATOR_CHOICES == ALLOCATORS
    from fastadvseg.utils.checkpoint import RESUMABLE

    assert "allocator" in RESUMABLE  # a run may continue on a machine with another allocator


def test_a_missing_library_falls_back_to_steady_and_says_why(monkeypatch):
    monkeypatch.setattr(allocator, "_configured", None)
    monkeypatch.setattr(allocator, "loaded_library", lambda: None)
    monkeypatch.setattr(allocator, "find_library", lambda name: None)
    monkeypatch.setattr(allocator, "set_steady", lambda: None)  # not in the test process
    got = allocator.configure("jemalloc", reexec=True)
    assert got.name == "steady" and "jemalloc asked for but not found (apt install libjemalloc2)" in got.description
    monkeypatch.setattr(allocator, "set_steady", lambda: "no glibc mallopt on this platform")
    got = allocator.configure("auto")
    assert got.name == "system" and "no glibc mallopt" in got.description
    with pytest.raises(ValueError):
        allocator.configure("mimalloc")


def test_a_preloaded_library_is_kept(monkeypatch):
    monkeypatch.setattr(allocator, "loaded_library", lambda: "jemalloc")
    monkeypatch.setattr(allocator, "set_steady", lambda: pytest.fail("mallopt with jemalloc preloaded"))
    assert allocator.configure("auto").name == "jemalloc"
    kept = allocator.configure("steady")
    assert kept.name == "jemalloc" and "--allocator steady does not replace it" in kept.description


def test_preload_env_and_plain_env_round_trip():
    base = {"PATH": "/bin", "LD_PRELOAD": "/opt/libother.so"}
    env = allocator.preload_env("jemalloc", "/usr/lib/libjemalloc.so.2", base)
    assert env["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2:/opt/libother.so"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1" and env[allocator.REEXEC_MARK] == "jemalloc"
    assert allocator.plain_env(env) == base
    own = allocator.preload_env("jemalloc", "/x/libjemalloc.so.2", {"MALLOC_CONF": "narenas:2"})
    assert own["MALLOC_CONF"] == "narenas:2"  # the user's own settings win
