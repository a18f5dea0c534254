"""The package as a user gets it: an sdist and a wheel built from a clean copy of the repository.

The sdist is built from the tracked files only (what a fresh clone has: no build outputs, no compiled extension),
the wheel from the unpacked sdist, so a source the build needs but the sdist lacks fails here. Then: the sdist
holds every source of every backend (the cuda ones included, which this CPU machine does not build), the wheel
holds the package, its compiled cpu backend, its data and the licence, and the same modules import from the
installed wheel, run from an unrelated directory, as from the source tree, run from its root.

Both builds run offline through setuptools' PEP 517 backend without isolation (the `test` extra brings pybind11
and setuptools). Compiling the cpu extension takes most of the test's time (about 30 s on 2 cores).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import fastadvseg

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = f"fastadvseg-{fastadvseg.__version__}"


# Run in a child process: prints what a user sees after `import fastadvseg` (every module of the package imported).
PROBE = r"""
import json, pathlib, pkgutil, importlib, fastadvseg
names = sorted(m.name for m in pkgutil.walk_packages(fastadvseg.__path__, "fastadvseg."))
import_errors = {}
for name in names:  # a backend module that cannot run here raises ImportError by design (e.g. cuda on a CPU torch)
    try:
        importlib.import_module(name)
    except ImportError as exc:
        import_errors[name] = str(exc)
pkg = pathlib.Path(fastadvseg.__file__).parent
print(json.dumps({
    "location": str(pkg),
    "version": fastadvseg.__version__,
    "modules": names,
    "import_errors": import_errors,
    "cuda_sources": sorted(p.name for p in (pkg / "kernels" / "cuda").iterdir() if p.suffix in (".cu", ".cuh")),
    "backends": fastadvseg.available_backends("cpu"),
    "reasons": {b: fastadvseg.unavailable_reason(b) for b in ("triton", "cpu", "reference")},
}))
"""


def _build(backend_call, source_dir, out_dir):
    code = f"import setuptools.build_meta as b; print(b.{backend_call}({str(out_dir)!r}))"
    env = dict(os.environ, FASTADVSEG_NO_CUDA_EXT="1")  # a GPU machine would otherwise compile the cuda backend
    done = subprocess.run([sys.executable, "-c", code], cwd=source_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{backend_call} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out_dir / done.stdout.strip().splitlines()[-1]


def _probe(cwd, pythonpath):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout (the clean copy is made of the tracked files)")
    tmp = tmp_path_factory.mktemp("packaging")
    clean = tmp / "clean"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (clean / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clean / rel)
    sdist = _build("build_sdist", clean, tmp / "dist")
    with tarfile.open(sdist) as tar:
        sdist_names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    wheel = _build("build_wheel", tmp / "unpacked" / NAME, tmp / "dist")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as whl:
        wheel_names = set(whl.namelist())
        whl.extractall(site)
    return {"clean": clean, "sdist": sdist_names, "wheel_path": wheel, "wheel": wheel_names, "site": site,
            "tmp": tmp}


def test_sdist_holds_every_source_a_backend_needs(built):
    clean, names = built["clean"], built["sdist"]
    needed = {p.relative_to(clean).as_posix() for d in ("csrc", "fastadvseg") for p in (clean / d).rglob("*")
              if p.is_file()}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"}
    assert {"csrc/cuda/binding.cpp", "csrc/cpu/kernels_impl.h", "fastadvseg/kernels/cuda/launchers.cuh"} <= needed
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))], "the sdist carries build outputs"


def test_wheel_holds_the_package_its_cpu_backend_and_licence(built):
    names = built["wheel"]
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"fastadvseg", f"{NAME}.dist-info"}, f"unexpected top-level entries: {tops}"
    for required in ("fastadvseg/py.typed", "fastadvseg/kernels/cuda/launchers.cuh",
                     "fastadvseg/kernels/triton/generator_loss.py", "fastadvseg/configs/voc_1_8.yaml",
                     f"{NAME}.dist-info/licenses/LICENSE"):
        assert required in names
    assert [n for n in names if n.startswith("fastadvseg/_C_cpu") and n.endswith(".so")], "no cpu backend"
    # A wheel with a compiled extension is specific to the interpreter and platform (e.g. cp311-cp311-linux_x86_64;
    # publishing it on PyPI would take auditwheel's manylinux retagging).
    assert not built["wheel_path"].name.endswith("-none-any.whl")
    with zipfile.ZipFile(built["wheel_path"]) as whl:
        meta = whl.read(f"{NAME}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    # the losses need torch and numpy only; the pipeline's packages come with the "train" extra (the tests use it)
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: torch>=2.4", "Requires-Dist: numpy"]
    for dist in ("matplotlib", "pyyaml", "pillow"):
        assert [r for r in requires if r.startswith(f"Requires-Dist: {dist};")] == [
            f'Requires-Dist: {dist}; extra == "train"', f'Requires-Dist: {dist}; extra == "test"']
    assert [r for r in requires if r.startswith("Requires-Dist: triton")] == [
        'Requires-Dist: triton>=3.0; extra == "triton"', 'Requires-Dist: triton>=3.0; extra == "test"']


def test_installed_wheel_imports_as_the_source_tree_from_any_directory(built):
    elsewhere = built["tmp"] / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    from_wheel = _probe(elsewhere, built["site"])
    # The source tree (the clean copy: this checkout may hold other work in progress) after an in-place build of
    # its extension, run from its root as `python -m ...` would be: the compiled module is the wheel's.
    tree = built["clean"]
    for so in (built["site"] / "fastadvseg").glob("_C_cpu*.so"):
        shutil.copy2(so, tree / "fastadvseg" / so.name)
    from_tree = _probe(tree, tree)
    assert from_wheel.pop("location") == str(built["site"] / "fastadvseg")
    assert from_tree.pop("location") == str(tree / "fastadvseg")
    assert from_wheel == from_tree
    assert {"cpu", "reference"} <= set(from_wheel["backends"]) and from_wheel["reasons"]["cpu"] is None


def test_without_triton_the_triton_backend_says_what_is_missing():
    code = ("import sys; sys.modules['triton'] = None\n"  # what `import triton` does where it is not installed
            "import torch, fastadvseg as fas\n"
            "print(fas.available_backends('cpu')); print(fas.unavailable_reason('triton'))\n"
            "print(fas.softmax2d(torch.zeros(1, 2, 3, 3)).sum().item())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    backends, reason, total = done.stdout.strip().splitlines()
    assert "triton" not in backends and "cpu" in backends
    assert 'pip install "fastadvseg[triton]"' in reason
    assert float(total) == 9.0
