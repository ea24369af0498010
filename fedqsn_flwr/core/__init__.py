"""The algorithm: masks, quantization, aggregation, feedback, the server secret.

PyTorch and NumPy only (numba for the quantizer's kernels); nothing here imports Flower.
"""
