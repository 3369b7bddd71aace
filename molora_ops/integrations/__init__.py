"""Integrations with the Hugging Face stack (optional dependencies, imported on first use).

- ``molora_ops.integrations.hf_transformers``: turn a transformers causal LM into a MoE-LoRA model
  by method name (``apply_molora``), aux losses, merge/unmerge, adapter-only save/load.
- ``molora_ops.integrations.hf_peft``: expert banks from saved PEFT LoRA adapters, and in-place
  acceleration of a PEFT X-LoRA model with the fused ops.
- ``molora_ops.integrations.hf_kernels``: a forward-only layer in the Hugging Face ``kernels``
  convention, and its ``kernelize`` mapping.

Each submodule imports its framework (transformers / peft / kernels) itself, so ``import
molora_ops`` never needs them.
"""
