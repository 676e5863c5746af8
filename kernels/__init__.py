"""Operators behind kvfx's compressed cache.

Each module holds the plain-torch reference of one operator (read it as the
paper's formula). Triton kernels go beside their reference; only the module's
public function dispatches between them.
"""
