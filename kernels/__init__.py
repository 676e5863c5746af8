"""Operators behind kvfx's compressed cache.

One folder per operator, ``kernels/<op>/``: ``reference.py`` holds the
plain-torch reference (read it as the paper's formula), ``triton.py`` the
Triton kernels, and ``__init__.py`` the public function, built once by
``dispatch.dispatched`` (Triton on CUDA, the reference on CPU,
``KVFX_KERNELS`` forces one).
"""
