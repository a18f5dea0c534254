"""Build and install fastadvseg.

``fastadvseg/kernels/`` holds the kernel sources (Triton in kernels/triton, CUDA device code in kernels/cuda);
``csrc/`` holds the C++ bindings and CPU code of the native extensions.
"""
import os
import re
import shutil
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

PACKAGES = find_packages(include=["fastadvseg", "fastadvseg.*"])


def _version():
    """The one place the version is written: ``__version__`` in fastadvseg/__init__.py (read, not imported: the
    package imports torch, which a build need not have)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastadvseg", "__init__.py"),
              encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


# --- native extensions -------------------------------------------------------------------------------------------
# The cpu backend (csrc/cpu -> fastadvseg._C_cpu): a plain pybind11 extension without torch headers, so it builds
# in seconds and needs no torch at build time. Flags: -O3 -fopenmp -std=c++17 and -fno-trapping-math (lets the
# compiler vectorise selects; NaN/Inf propagation is unchanged). No -ffast-math: NaN/Inf propagation is specified
# behaviour. Portable by default; FASTADVSEG_CPU_NATIVE=1 adds -march=native. FASTADVSEG_NO_CPU_EXT=1 skips it.
CPU_EXT = "fastadvseg._C_cpu"


def _env_on(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _cpu_extensions():
    if _env_on("FASTADVSEG_NO_CPU_EXT"):
        print("fastadvseg: FASTADVSEG_NO_CPU_EXT is set; the cpu backend is not built", file=sys.stderr)
        return []
    try:
        import pybind11
    except ImportError:
        print("fastadvseg: pybind11 is not installed; the cpu backend is not built "
              "(pip install pybind11, then pip install -e . again)", file=sys.stderr)
        return []
    return [Extension(
        CPU_EXT,
        sources=["csrc/cpu/bindings.cpp", "csrc/cpu/kernels.cpp", "csrc/cpu/kernels_base.cpp", "csrc/cpu/kernels_avx2.cpp",
                 "csrc/cpu/kernels_avx512.cpp"],
        include_dirs=[pybind11.get_include(), "csrc/cpu"],
        depends=["csrc/cpu/kernels.h", "csrc/cpu/kernels_impl.h", "csrc/cpu/dtypes.h"],
        language="c++",
    )]


def _cpu_flags(compiler_type, openmp=True):
    if compiler_type == "msvc":
        return ["/O2", "/std:c++17"] + (["/openmp"] if openmp else []), []
    compile_args = ["-O3", "-g0", "-std=c++17", "-fno-trapping-math", "-fvisibility=hidden", "-Wno-psabi"]
    if _env_on("FASTADVSEG_CPU_NATIVE"):
        compile_args.append("-march=native")
    return compile_args + (["-fopenmp"] if openmp else []), (["-fopenmp"] if openmp else [])


class OptionalBuildExt(build_ext):
    """build_ext where a native extension that fails to build is reported and skipped, never fatal.

    The library then runs without that backend (fastadvseg.unavailable_reason(name) says why at runtime).
    """

    def run(self):
        try:
            super().run()
        except Exception as exc:  # e.g. no C++ compiler at all
            self._report("native extensions", exc)

    def build_extension(self, ext):
        if ext.name != CPU_EXT:
            try:
                return super().build_extension(ext)
            except Exception as exc:
                return self._report(ext.name, exc)
        for openmp in (True, False):  # a compiler without OpenMP still gets a (single-threaded) cpu backend
            ext.extra_compile_args, ext.extra_link_args = _cpu_flags(self.compiler.compiler_type, openmp)
            try:
                return super().build_extension(ext)
            except Exception as exc:
                if not openmp:
                    return self._report(ext.name, exc)
                print(f"fastadvseg: building {ext.name} with OpenMP failed ({exc}); retrying without",
                      file=sys.stderr)

    @staticmethod
    def _report(what, exc):
        print(f"fastadvseg: WARNING: {what} not built ({type(exc).__name__}: {exc}); "
              "the library falls back to the other backends", file=sys.stderr)


# The cuda backend (csrc/cuda/binding.cpp + fastadvseg/kernels/cuda/*.cu -> fastadvseg._cuda_kernels): a torch CUDAExtension,
# built only where torch itself has CUDA and finds a CUDA toolkit (CUDA_HOME) of the same major version; anywhere
# else (a CPU build of torch, an isolated build without torch, no toolkit) it is skipped, and the library runs the
# other backends. On a GPU machine build it with `pip install -e . --no-build-isolation`. Targets sm_80 and sm_90
# (+ PTX for newer GPUs) unless TORCH_CUDA_ARCH_LIST is set. FASTADVSEG_NO_CUDA_EXT=1 skips it.
CUDA_EXT = "fastadvseg._cuda_kernels"


def _is_toolkit(path):
    """Whether ``path`` is a CUDA toolkit root: bin/nvcc, and cuda_runtime_api.h in include/ (or, as some
    packagings lay it out, targets/<platform>/include/)."""
    import glob

    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
        os.path.isfile(os.path.join(path, "include", "cuda_runtime_api.h"))
        or bool(glob.glob(os.path.join(path, "targets", "*", "include", "cuda_runtime_api.h"))))


def _toolkit_of_nvcc(nvcc):
    """The CUDA toolkit root of the ``nvcc`` command, or None.

    torch guesses CUDA_HOME as the parent of the folder of the nvcc on PATH; where that nvcc is a symlink, or a
    wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` in /usr/local/bin), that parent holds no CUDA
    headers and the build fails on ``cuda_runtime_api.h``. So: follow symlinks, then ask nvcc itself, whose
    ``--dryrun`` lists its own location (``#$ TOP=<toolkit>/bin/..``, ``#$ _HERE_=<toolkit>/bin``) without compiling
    anything."""
    import subprocess

    found = shutil.which(nvcc)
    if not found:
        return None
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(found)))]
    try:
        proc = subprocess.run([found, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
        text = proc.stdout + proc.stderr
        candidates += re.findall(r"^#\$ TOP=(.+?)\s*$", text, re.M)
        candidates += [os.path.dirname(h) for h in re.findall(r"^#\$ _HERE_=(.+?)\s*$", text, re.M)]
    except (OSError, subprocess.SubprocessError):
        pass
    for path in candidates:
        path = os.path.realpath(path)
        if _is_toolkit(path):
            return path
    return None


def _resolve_cuda_home():
    """When neither CUDA_HOME nor CUDA_PATH is set: set CUDA_HOME, before torch.utils.cpp_extension reads it, to
    the real toolkit of the nvcc on PATH (:func:`_toolkit_of_nvcc`). Returns whether CUDA_HOME was guessed (set
    here or left to torch), not given."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return False  # the user's choice, used as it is
    home = _toolkit_of_nvcc("nvcc")
    if home is not None:
        os.environ["CUDA_HOME"] = home
        print(f"fastadvseg: CUDA_HOME is not set; building the cuda backend with the toolkit of the nvcc on PATH: "
              f"{home}", file=sys.stderr)
    return True


def _cuda_extensions():
    if _env_on("FASTADVSEG_NO_CUDA_EXT"):
        print("fastadvseg: FASTADVSEG_NO_CUDA_EXT is set; the cuda backend is not built", file=sys.stderr)
        return []
    try:
        import torch
    except Exception:  # an isolated build (no torch): the cuda backend needs a CUDA torch at build time
        return []
    if torch.version.cuda is None:
        return []  # a CPU build of torch (its CUDA_HOME is None even with nvcc on the PATH)
    guessed = _resolve_cuda_home()  # before cpp_extension is imported: it reads CUDA_HOME once, at import
    try:
        from torch.utils import cpp_extension
    except Exception as exc:
        print(f"fastadvseg: WARNING: torch.utils.cpp_extension does not import ({exc}); the cuda backend is not "
              "built", file=sys.stderr)
        return []
    if guessed and os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # it was imported before setup.py ran: same fix
    problem = None
    if cpp_extension.CUDA_HOME is None:
        problem = "torch has CUDA but no CUDA toolkit was found (put nvcc on PATH or set CUDA_HOME)"
    elif guessed and not _is_toolkit(cpp_extension.CUDA_HOME):
        problem = (f"no CUDA toolkit at {cpp_extension.CUDA_HOME}, torch's guess from the nvcc on PATH (no bin/nvcc "
                   "or include/cuda_runtime_api.h there); set CUDA_HOME")
    if problem:
        print(f"fastadvseg: WARNING: {problem}; the cuda backend is not built", file=sys.stderr)
        return []
    import glob
    import re
    import subprocess
    try:
        nvcc_version = subprocess.run([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
                                      capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"fastadvseg: nvcc in {cpp_extension.CUDA_HOME} does not run ({exc}); the cuda backend is not built",
              file=sys.stderr)
        return []
    release = re.search(r"release (\d+)\.(\d+)", nvcc_version)
    if release and release.group(1) != torch.version.cuda.split(".")[0]:
        print(f"fastadvseg: the CUDA toolkit (nvcc {release.group(1)}.{release.group(2)}) and torch's CUDA "
              f"({torch.version.cuda}) differ in "
              "major version; the cuda backend is not built", file=sys.stderr)
        return []
    nvcc_flags = ["-O3", "-lineinfo"]  # no -std: BuildExtension adds the standard torch's headers need
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                       "-gencode=arch=compute_90,code=compute_90"]
    return [cpp_extension.CUDAExtension(
        CUDA_EXT,
        sources=["csrc/cuda/binding.cpp"] + sorted(glob.glob("fastadvseg/kernels/cuda/*.cu")),
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastadvseg", "kernels", "cuda")],
        depends=sorted(glob.glob("fastadvseg/kernels/cuda/*.cuh")),
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )]


def _with_cuda_build(base, extensions):
    """``base``, plus torch's BuildExtension (which compiles the .cu sources with nvcc) when the cuda backend is built."""
    if not any(ext.name == CUDA_EXT for ext in extensions):
        return base
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtWithCuda(base, BuildExtension):
        pass

    return BuildExtWithCuda


EXT_MODULES = _cpu_extensions() + _cuda_extensions()
CMDCLASS = {"build_ext": _with_cuda_build(OptionalBuildExt, EXT_MODULES)}
TRAIN_EXTRAS = ["matplotlib", "pyyaml", "pillow"]  # fastadvseg/config.py PIPELINE_EXTRAS checks the same three

setup(
    name="fastadvseg",
    version=_version(),
    description="Fused kernels and a training pipeline for semi-supervised semantic segmentation with adversarial learning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license_expression="Apache-2.0",
    license_files=["LICENSE"],
    keywords=["semantic segmentation", "semi-supervised learning", "adversarial learning", "pytorch", "triton",
              "fused kernels"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Typing :: Typed",
    ],
    python_requires=">=3.9",
    packages=PACKAGES,
    package_data={"fastadvseg": ["py.typed", "configs/*.yaml", "configs/*.json", "models/pretrained/*.pt",
                                "models/pretrained/*.json"],
                  "fastadvseg.kernels": ["cuda/*.cu", "cuda/*.cuh"]},
    # No upper pins and no CUDA-specific wheels: a CPU machine keeps its CPU torch.
    # Triton is not required: the CUDA builds of torch on Linux bring their own, and a CPU machine never runs it
    # (the `triton` backend then says what is missing: fastadvseg.unavailable_reason("triton")). The `triton` extra
    # names it for the rare GPU install without it; the `test` extra keeps it, to test the Triton kernels under
    # TRITON_INTERPRET=1 on CPU, and pybind11 + setuptools, to build the sdist and wheel offline in the tests.
    # The losses need torch and numpy only. The "train" extra is the pipeline's: matplotlib (the run's and the
    # benchmark report's PNG plots), pyyaml (run configs), pillow (dataset images and PNG masks, fastadvseg.data).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "train": TRAIN_EXTRAS,
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "pybind11>=2.10", "setuptools>=77", *TRAIN_EXTRAS],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
