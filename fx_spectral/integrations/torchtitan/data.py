"""A tokenizer and a dataset for TorchTitan built on this machine, with no download.

The text is the one the Lipschitz demo trains on: the top-level ``*.py`` files of this
interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), a file going to validation
when ``zlib.crc32(file_name) % 10 == 0``. From it:

* :func:`build_tokenizer` trains a byte-level BPE tokenizer (the ``tokenizers`` library, a
  TorchTitan dependency) on the training files and writes ``tokenizer.json`` and
  ``tokenizer_config.json`` (BOS/EOS tokens) to a cache folder, the layout TorchTitan's
  ``HuggingFaceTokenizer`` reads from ``--hf_assets_path``;
* :func:`register_dataset` adds ``"python_stdlib"`` (one sample per training file, field
  ``text``) and ``"python_stdlib_validation"`` to TorchTitan's dataset table, for
  ``--dataloader.dataset python_stdlib``.

``python -m fx_spectral.integrations.torchtitan.data`` builds the tokenizer and prints its folder.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

__all__ = ["DATASET", "VALIDATION_DATASET", "stdlib_texts", "cache_dir", "build_tokenizer", "register_dataset"]

DATASET = "python_stdlib"
VALIDATION_DATASET = "python_stdlib_validation"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def stdlib_texts(split: str = "train", root: str | Path | None = None) -> list[str]:
    """The text of the standard library's top-level ``*.py`` files of ``split`` ("train" / "validation")."""
    if split not in ("train", "validation"):
        raise ValueError(f"stdlib_texts: split must be 'train' or 'validation', got {split!r}")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        is_val = zlib.crc32(path.name.encode()) % 10 == 0
        if is_val == (split == "validation"):
            out.append(path.read_text(encoding="utf-8", errors="replace"))
    if not out:
        raise RuntimeError(f"fx_spectral: no *.py files of the {split} split under {root}")
    return out


def cache_dir() -> Path:
    """``$FX_SPECTRAL_CACHE`` or ``~/.cache/fx_spectral``."""
    return Path(os.environ.get("FX_SPECTRAL_CACHE") or Path.home() / ".cache" / "fx_spectral")


def build_tokenizer(vocab_size: int = 2048, path: str | Path | None = None) -> str:
    """Train (once, then cached) a byte-level BPE tokenizer of ``vocab_size`` tokens; return its folder.

    ``vocab_size`` counts the two special tokens (BOS id 0, EOS id 1); it must not exceed the
    model's vocabulary (2048 for TorchTitan's Qwen3 debugmodel). Safe when several ranks call it
    at once: each builds in a private folder and the first rename wins.

    Example::

        folder = build_tokenizer()   # then: --hf_assets_path <folder>
    """
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"build_tokenizer: vocab_size must be an int >= 258 (256 bytes + BOS/EOS), got {vocab_size!r}")
    v = sys.version_info
    final = Path(path) if path is not None else cache_dir() / f"tokenizer-stdlib-bpe{vocab_size}-py{v.major}{v.minor}"
    if (final / "tokenizer.json").exists():
        return str(final)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts("train"), trainer=trainer)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    tok.save(str(tmp / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": True}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:  # another rank got there first
        if not (final / "tokenizer.json").exists():
            raise
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return str(final)


def _load(path: str):
    from datasets import Dataset

    return Dataset.from_dict({"text": stdlib_texts(path)})


def _text(sample: dict) -> str:
    return sample["text"]


def register_dataset() -> None:
    """Add ``"python_stdlib"`` / ``"python_stdlib_validation"`` to TorchTitan's text dataset table.

    NB: mutates ``torchtitan.hf_datasets.text_datasets.DATASETS`` (adds two keys; idempotent).
    """
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS.setdefault(DATASET, DatasetConfig(path="train", loader=_load, sample_processor=_text))
    DATASETS.setdefault(VALIDATION_DATASET, DatasetConfig(path="validation", loader=_load, sample_processor=_text))


if __name__ == "__main__":
    print(build_tokenizer(int(sys.argv[1]) if len(sys.argv) > 1 else 2048))
