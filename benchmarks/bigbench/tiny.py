"""The `tiny` preset's stand-ins: synthetic task.json files in BIG-bench's schema, a tiny tokenizer and tiny models.

The smoke test must run the real pipeline (selection rules, family split, collection, conditions, generators,
scoring, report) in seconds without downloads, so the tasks are written as `task.json` files with the fields BIG-bench
uses (`description`, `keywords`, `examples` with `target` or `target_scores`, optional prefixes), grouped in
family folders, and read back by the same code as the real ones. One non-English task and one with too few examples
are included so the selection rules have something to refuse.
"""

import json
import random
from pathlib import Path

WORDS = "red blue green cat dog sun moon tree river stone bird fish king queen road ship".split()


def _examples(family: str, count: int, rng: random.Random) -> list[dict]:
    examples = []
    for _ in range(count):
        words = rng.sample(WORDS, 3)
        a, b = rng.randrange(10), rng.randrange(10)
        if family == "first_word":
            examples.append({"input": " ".join(words), "target": words[0]})
        elif family == "last_word":
            examples.append({"input": " ".join(words), "target": words[-1]})
        elif family == "addition":
            examples.append({"input": f"{a} plus {b}", "target": str(a + b)})
        elif family == "parity":
            examples.append({"input": f"is {a} even", "target_scores": {"yes": int(a % 2 == 0), "no": int(a % 2)}})
        elif family == "animal":
            word = rng.choice(WORDS)
            animal = word in {"cat", "dog", "bird", "fish"}
            examples.append(
                {"input": f"{word} animal", "target_scores": {"true": int(animal), "false": int(not animal)}}
            )
        elif family == "repeat":
            examples.append({"input": words[0], "target": f"{words[0]} {words[0]}"})
    return examples


TINY_TASKS = {  # path -> (description, keywords, extra fields)
    "first_word/plain": ("Say the first word of the list.", ["zero-shot"], {}),
    "first_word/prefixed": ("Name the first word.", ["zero-shot"], {"example_input_prefix": "\nList: "}),
    "last_word/plain": ("Say the last word of the list.", ["zero-shot"], {}),
    "addition/small": ("Add two small numbers.", ["arithmetic"], {}),
    "addition/worded": ("Sum of two digits.", ["arithmetic"], {"example_output_prefix": "\nSum: "}),
    "parity/even": ("Decide whether a number is even.", ["multiple choice"], {}),
    "animal/kind": ("Is the word an animal?", ["multiple choice"], {}),
    "repeat/twice": ("Repeat the word twice.", ["zero-shot"], {}),
    "foreign/words": ("Sag das erste Wort.", ["non-English"], {}),
    "short/few": ("Too few examples.", ["zero-shot"], {}),
}


def write_tiny_tasks(folder: str | Path, count: int = 60) -> Path:
    """Write the synthetic task.json files under `folder` (family/subtask/task.json); return `folder`."""
    folder = Path(folder)
    rng = random.Random(0)
    for path, (description, keywords, extra) in TINY_TASKS.items():
        family = path.split("/")[0]
        source = {"foreign": "first_word", "short": "last_word"}.get(family, family)
        examples = _examples(source, 10 if family == "short" else count, rng)
        task = {"name": path, "description": description, "keywords": keywords, "examples": examples, **extra}
        target = folder / path / "task.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(task, indent=1), encoding="utf-8")
    return folder


def tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) trained in milliseconds on the tiny tasks' words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    corpus = [" ".join(WORDS), "Q: A: List: Sum: plus is even animal yes no true false choice:"] * 4
    tokenizer.train_from_iterator(corpus + [str(number) for number in range(20)], trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special, pad_token=special)


def tiny_base_model(tokenizer):
    from peft_cvae.testing_utils import tiny_llama

    return tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64)


def tiny_text_encoder_folder(folder: str | Path) -> str:
    """A tiny random BERT sentence encoder saved to `folder` (for `TextTaskEncoder`)."""
    from transformers import BertTokenizer

    from peft_cvae.testing_utils import tiny_bert

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(
        {word.strip(".?!,").lower() for description, _, _ in TINY_TASKS.values() for word in description.split()}
    )
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *WORDS]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_bert(len(dict.fromkeys(vocab))).save_pretrained(folder)
    return str(folder)
