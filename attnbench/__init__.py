"""attnbench: verification and benchmarks for attention kernels."""
__version__ = "0.1.0"
