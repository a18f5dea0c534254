"""Triton kernels, one op family per file; the autograd layer is ``fastadvseg/backends/triton.py``."""
