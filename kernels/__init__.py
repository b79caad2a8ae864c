"""Fused kernels (Triton on GPUs, C++ on CPUs), each beside a plain PyTorch reference.

Nothing lives here yet: the first kernels arrive with the heterogeneous-memory work (C++ CPU
Adam). The package exists so that the layout of the project is fixed from the start.
"""
