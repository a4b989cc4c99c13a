"""`load_base_model`: a causal LM and its tokenizer from a folder or Hub id, ready for fine-tuning, task encoding and
scoring (the tokenizer always has a pad token), with one clear error when the folder holds no such model."""

from pathlib import Path

import torch

from .errors import MissingFileError

__all__ = ["load_base_model", "model_path"]


def model_path(name_or_path: str) -> str:
    """An existing local folder as an absolute path (so it is recorded in configs usefully); else unchanged."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) of a causal LM folder or Hub id; the tokenizer gets a pad token if it has none.

    Raises:
        MissingFileError: the folder or repo holds no loadable causal LM and tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingFileError(
            f"Cannot load the base model {name_or_path!r} ({first_line}). Pass a folder holding a transformers causal "
            "LM and its tokenizer (config.json, weights, tokenizer files)."
        ) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return model.eval(), tokenizer
