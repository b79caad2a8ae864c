"""Fused kernels (Triton on GPUs, C++ on CPUs), each beside a plain PyTorch reference.

`cpu_adam`: the C++ (OpenMP) Adam step the host-memory optimizers run. The package is not called
`kernels`: that is the import name of Hugging Face's `kernels` distribution, which transformers 5
depends on and imports, and a top-level `kernels` here would shadow it.
"""
