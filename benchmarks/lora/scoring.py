"""Scoring LoRAs on held-out text (cached by the LoRA's bytes), PEFT's merges, and the geometry of generated LoRAs
against the bank's checkpoints (memorisation controls)."""

import copy
import hashlib
import math
from pathlib import Path

import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from peft_cvae import LoraLayout
from peft_cvae.evaluation import evaluate_language_model
from peft_cvae.file_utils import read_json, write_json

from .domains import domain_texts
from .settings import EVAL_FIELDS, Settings


class Scorer:
    """One PeftModel over the base; each candidate LoRA is loaded into its "scratch" adapter and scored.

    Scores are cached on disk, keyed by the domain, split, evaluation settings and the LoRA's bytes, so the same LoRA
    is never scored twice, across methods, presets and reruns.
    """

    def __init__(self, base, tokenizer, layout: LoraLayout, settings: Settings, cache: Path):
        self.model = get_peft_model(copy.deepcopy(base), layout.peft_config(), adapter_name="scratch").eval()
        self.tokenizer, self.layout, self.settings, self.cache = tokenizer, layout, settings, cache
        self.path = cache / f"scores-{settings.key(EVAL_FIELDS)}.json"
        self.scores = read_json(self.path, what="score cache") if self.path.exists() else {}
        self.texts = {}

    def _key(self, state_dict: dict | None, domain: str, split: str) -> str:
        digest = hashlib.sha256(f"{domain}/{split}".encode())
        if state_dict is not None:
            digest.update(self.layout.flatten(state_dict).float().numpy().tobytes())
        return digest.hexdigest()[:20]

    def score(self, state_dict: dict | None, domain: str, split: str = "test") -> dict:
        """Perplexity, bits per character, ... of the base model with this LoRA (None: the base model alone)."""
        key = self._key(state_dict, domain, split)
        if key not in self.scores:
            if (domain, split) not in self.texts:
                self.texts[domain, split] = domain_texts(domain, split, self.settings, self.cache)
            dtype = None if self.settings.tiny else torch.bfloat16
            kwargs = {"max_length": self.settings.eval_max_length, "autocast_dtype": dtype}
            if state_dict is None:
                with self.model.disable_adapter():
                    result = evaluate_language_model(self.model, self.tokenizer, self.texts[domain, split], **kwargs)
            else:
                set_peft_model_state_dict(self.model, state_dict, adapter_name="scratch")
                result = evaluate_language_model(self.model, self.tokenizer, self.texts[domain, split], **kwargs)
            on_disk = read_json(self.path, what="score cache") if self.path.exists() else {}
            self.scores = {**on_disk, **self.scores, key: result}  # keep what another run wrote meanwhile
            write_json(self.scores, self.path)
        return self.scores[key]

    def merge(self, state_dicts: list[dict], weights: list[float], combination_type: str) -> dict:
        """PEFT's `add_weighted_adapter` of several LoRAs (TIES with density 0.5), as a state dict of the layout."""
        names = []
        for index, state in enumerate(state_dicts):
            name = f"merge_input_{index}"
            self.model.add_adapter(name, self.layout.peft_config())
            set_peft_model_state_dict(self.model, state, adapter_name=name)
            names.append(name)
        options = {"density": 0.5} if "ties" in combination_type else {}
        self.model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **options)
        merged = get_peft_model_state_dict(self.model, adapter_name="merged")
        for name in [*names, "merged"]:
            self.model.delete_adapter(name)
        self.model.set_adapter("scratch")
        return {key: value.detach().float().cpu() for key, value in merged.items()}


def recovery(base: float, lora: float, method: float) -> float:
    """Share of the base -> LoRA perplexity drop that a method recovers (1 = as good as the LoRA, 0 = base)."""
    return (base - method) / (base - lora) if base != lora else math.nan


def task_rows(tasks: list[str], name: str) -> list[int]:
    """The rows (checkpoint indices of a bank in order) that belong to task `name`."""
    return [row for row, task in enumerate(tasks) if task == name]


def average_loras(layout: LoraLayout, states: list[dict], weights: list[float] | None = None) -> dict:
    """The weighted (default: uniform) average of LoRA state dicts, element by element: a model soup."""
    weights = weights or [1.0 / len(states)] * len(states)
    return layout.unflatten(sum(w * layout.flatten(s) for w, s in zip(weights, states)))


def best_of_k(generator, condition, name: str, scorer: Scorer, settings: Settings) -> dict:
    """Draw k samples (z ~ N(0, I)) and keep the one with the lowest perplexity on the validation split."""
    samples = generator.generate_adapter(condition, num_samples=settings.best_of_k, seed=settings.seed)
    samples = samples if isinstance(samples, list) else [samples]
    validation = [scorer.score(sample.state_dict, name, "validation")["perplexity"] for sample in samples]
    return samples[min(range(len(samples)), key=validation.__getitem__)].state_dict


def memorisation(flat: torch.Tensor, vectors: torch.Tensor, tasks: list[str], name: str) -> tuple[dict, int]:
    """Distances of a generated LoRA to the bank, next to the spread among the domain's own checkpoints."""
    distances = (vectors - flat).norm(dim=1)  # (K,)
    nearest = int(distances.argmin())
    own = vectors[task_rows(tasks, name)]
    spread = torch.pdist(own)
    return {
        "generated_to_nearest_checkpoint": float(distances[nearest]),
        "nearest_checkpoint_task": tasks[nearest],
        "cosine_to_nearest": float(torch.nn.functional.cosine_similarity(flat, vectors[nearest], dim=0)),
        "generated_to_own_checkpoint_mean": float((flat - own.mean(0)).norm()),
        "generated_to_own_final": float((flat - own[-1]).norm()),
        "own_checkpoint_spread_mean": float(spread.mean()) if len(spread) else 0.0,
        "own_checkpoint_spread_min": float(spread.min()) if len(spread) else 0.0,
        "own_checkpoints_to_their_mean": float((own - own.mean(0)).norm(dim=1).mean()),
    }, nearest


def checkpoint_geometry(vectors: torch.Tensor, tasks: list[str], finals: dict, layout: LoraLayout) -> dict:
    """How far apart the final LoRAs of different domains are, next to the spread within a domain."""
    names = list(finals)
    flats = torch.stack([layout.flatten(finals[name]) for name in names])
    between = torch.pdist(flats)
    within = [float(torch.pdist(vectors[task_rows(tasks, name)]).mean()) for name in names]
    return {
        "between_domain_finals_mean": float(between.mean()),
        "between_domain_finals_min": float(between.min()),
        "within_domain_spread_mean": sum(within) / len(within),
    }
