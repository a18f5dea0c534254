"""Backends, one module each; ``fastadvseg/_dispatch.py`` holds the table that names them.

``reference.py`` is plain PyTorch: the definition of what every op computes (its sums and maps), the fallback, and
the oracle of the kernels. The kernel backends (``cpu.py``, ``triton.py``, ``cuda.py``) hold launches only; what a
launch receives and returns is written once, in ``_launch.py``.
"""
