"""Backends, one module each; ``fastadvseg/_dispatch.py`` holds the table that names them.

``reference.py`` defines the argument list of every op; the others implement the same functions with kernels.
"""
