"""molora_ops benchmark suite: ``python -m bench`` from the repository root (bench/README.md)."""
