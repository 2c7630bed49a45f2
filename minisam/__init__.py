"""minisam: Sharpness-Aware Minimization from scratch in NumPy/CuPy."""
__version__ = "0.1.0"
