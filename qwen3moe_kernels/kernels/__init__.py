"""Triton kernels and their launchers, one module per op stem. Imported only where triton is available."""
