"""Integrations of fx_spectral with training frameworks.

* :mod:`fx_spectral.integrations.torchtitan` — spectral constraints for TorchTitan (Qwen3, FSDP2 /
  tensor parallel), configured from the training config (``pip install fx_spectral[torchtitan]``).
"""
