"""Integrations of fx_spectral with training frameworks.

* :mod:`fx_spectral.integrations.torchtitan` — spectral constraints for TorchTitan (Qwen3, FSDP2 /
  tensor parallel), configured from the training config (``pip install -e ".[torchtitan]"`` from a clone).
* :mod:`fx_spectral.integrations.hf` — default per-role caps for Hugging Face Qwen3 / Llama-style
  decoders (``qwen3_roles``).
"""
