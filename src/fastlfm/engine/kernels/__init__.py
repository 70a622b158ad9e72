"""Triton kernels for the CUDA path (imported lazily: CPU runs never touch triton)."""
