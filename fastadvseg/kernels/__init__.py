"""Kernel sources, installed as ``fastadvseg.kernels``: Triton kernels in ``triton/``, CUDA device code in ``cuda/``."""
