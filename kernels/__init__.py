"""Operators behind kvfx's compressed cache.

One folder per operator, ``kernels/<op>/``: ``reference.py`` holds the
plain-torch reference (read it as the paper's formula), ``triton.py`` the
Triton kernels, and ``__init__.py`` the public function, built once by
``dispatch.dispatched`` (Triton on CUDA, the reference on CPU,
``KVFX_KERNELS`` forces one).
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python put this checkout's root on
    # sys.path (``python -m`` run from it). transformers (>= 5.25 requires
    # it) imports the PyPI package of that name: hand the name to it when it
    # is installed, instead of shadowing it with this folder.
    import importlib.machinery as _machinery
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        import importlib.util as _util

        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
