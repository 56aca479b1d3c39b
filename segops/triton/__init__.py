"""Triton kernels and their launchers, one module per operator (tensors in, tensors out).

Imported lazily by segops.ops when the triton backend is first used, never at `import segops`.
"""
