"""Benchmark harness: mlx-dgemma (us) side by side with mlx-vlm and the transformers reference.

Run `python -m bench --help`; see bench/README.md.
"""
