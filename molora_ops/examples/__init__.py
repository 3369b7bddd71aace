"""Runnable examples of molora_ops.modules (``python -m molora_ops.examples.<name>``)."""
