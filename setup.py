"""Build and install fastadvseg.

``kernels/`` (Triton sources in kernels/triton, CUDA device code in kernels/cuda) is installed as the subpackage
``fastadvseg.kernels``; ``csrc/`` holds the C++ bindings and CPU code of the native extensions.
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["fastadvseg", "fastadvseg.*"]) + [
    "fastadvseg.kernels",
    "fastadvseg.kernels.triton",
]

setup(
    name="fastadvseg",
    version="0.1.0",
    description="Fused kernels and a training pipeline for semi-supervised semantic segmentation with adversarial learning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={"fastadvseg": "fastadvseg", "fastadvseg.kernels": "kernels"},
    package_data={"fastadvseg": ["configs/*.yaml", "configs/*.json"], "fastadvseg.kernels": ["cuda/*.cu", "cuda/*.cuh"]},
    # No upper pins and no CUDA-specific wheels: a CPU machine keeps its CPU torch.
    # matplotlib: the training run's and the benchmark report's PNG plots; pyyaml: the shipped run configs.
    install_requires=["torch>=2.4", "numpy", "matplotlib", "pyyaml", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0"],
    },
)
