"""Generation: from a task (a name, a description, example texts, a condition tensor or a list of those to fuse) to
LoRA adapters, with a trained `PeftCVAEGenerator`.

Kept apart from the network as transformers keeps its `GenerationMixin` apart from its models (the name differs on
purpose: transformers treats any base class whose name holds "GenerationMixin" as text generation and writes a
generation_config.json): `modeling_peft_cvae.py`
says what the generator computes (encode, decode, the loss); this module says how a user's request becomes a
condition, a latent z and an adapter file. The mixin relies on the model's `config`, `task_conditions`,
`param_offset`, `decoder`, `decode`, `denormalize`, `unpatchify` and `_check_condition`.

`generate_adapter` runs in five steps, one helper each: check the arguments (`_check_generation_arguments`, the one
place where they are checked), resolve the task(s) into conditions (`_resolve_conditions`), draw z (`_sample_latents`),
decode (`_decode_samples`) and wrap the vectors as `GeneratedAdapter`s (`_build_adapters`).
"""

import hashlib
import json
import logging
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from .adapter import GeneratedAdapter
from .condition_similarity import condition_similarity
from .constants import INTEGRITY_NAME
from .errors import ConditionError, InvalidArgumentError, NonFiniteError, UnknownTaskError
from .file_utils import sha256_file
from .task_encoding import load_task_encoder

__all__ = ["GenerateAdapterMixin"]

logger = logging.getLogger(__name__)

COMBINE_MODES = ("condition", "parameters")
NUM_NEIGHBOURS = 3  # nearest training tasks reported with each generated adapter
# Used as the "nothing in the bank is close" threshold only for a generator with a single training task (no pair of
# tasks to measure the bank's own spread with): below 0.3 cosine, sentence embeddings of two texts are unrelated.
FALLBACK_LOW_SIMILARITY = 0.3
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass
class _Request:
    """A task request resolved into what the decoder needs."""

    conditions: torch.Tensor  # (T, cond)
    weights: torch.Tensor  # (T,), sums to 1
    task_name: str | None  # a training task's name, when one was asked for alone
    metadata: dict = field(default_factory=dict)  # what is recorded in the adapter file


def _check_text(text, what: str) -> None:
    """A description or example text must say something: an empty or whitespace-only string is an empty condition."""
    if not text.strip():
        raise ConditionError(f"{what} is empty or whitespace ({text!r}); pass a text that describes the task.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConditionError(
            f"{what} is not valid Unicode text ({error.reason} at position {error.start}); pass a plain string."
        ) from error


def _check_generation_arguments(
    task, examples, weights, combine, num_samples, seed, temperature, base_model, adapter_name
) -> None:
    """Check every argument of `generate_adapter` before any work, raising a `PeftCVAEError` that names it.

    Kept in one place so that a bad argument is blamed as such (and never reaches torch as a raw TypeError, or the
    decoder as a NaN that would be blamed on the weights).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise InvalidArgumentError(
            f"temperature must be a number >= 0 (z ~ N(0, temperature^2 I)), got {type(temperature).__name__} "
            f"{temperature!r}."
        )
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(
            f"temperature must be a finite number >= 0, got {temperature!r}; 0 decodes the mean, 1 samples "
            "z ~ N(0, I)."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED):
        raise InvalidArgumentError(f"seed must be None or an integer in [0, 2**63 - 1], got {seed!r:.80}.")
    if base_model is not None and num_samples != 1:
        raise InvalidArgumentError("base_model= loads one adapter; use num_samples=1, or load each sample yourself.")
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise InvalidArgumentError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
    if combine not in COMBINE_MODES:
        raise ConditionError(f"combine must be 'condition' or 'parameters', got {combine!r}.")
    if (task is None) == (examples is None):
        raise ConditionError(
            "Pass either a task (a training task name, a description, a condition tensor, or a list of those to "
            "fuse) or examples=[example texts of one task], not " + ("both." if task is not None else "neither.")
        )
    if examples is not None:
        if isinstance(examples, str) or not isinstance(examples, (list, tuple)) or not examples:
            raise ConditionError(f"examples must be a non-empty list of texts, got {examples!r:.80}.")
        for text in examples:
            if not isinstance(text, str):
                raise ConditionError(f"examples must be texts (str), got a {type(text).__name__}.")
            _check_text(text, "An example text")
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if isinstance(task, (list, tuple)) and not task:
        raise ConditionError("The list of tasks to fuse is empty; pass at least one task.")
    for item in tasks:
        if isinstance(item, str):
            _check_text(item, "The task")
    if weights is not None and (
        isinstance(weights, (str, bytes, dict)) or not isinstance(weights, (list, tuple, torch.Tensor))
    ):
        raise ConditionError(
            f"weights must be a list (or 1-D tensor) of numbers, one per task, got {type(weights).__name__}."
        )


class GenerateAdapterMixin:
    """Task resolution, fusion, sampling and `generate_adapter` for `PeftCVAEGenerator`."""

    # ---- task -> condition --------------------------------------------------------------------------------------
    def get_task_encoder(self, base_model=None, tokenizer=None):
        """The encoder that made this generator's training conditions, rebuilt from `config.condition_encoder`.

        Loaded lazily and cached (see `peft_cvae.load_task_encoder`). A hidden-state encoder runs `base_model` when it
        is given (a plain transformers model, not a `PeftModel`), and otherwise loads the recorded base model.

        Raises:
            ConditionError: no encoder was recorded (the bank's conditions were plain tensors), or it cannot be built.
        """
        spec = self.config.condition_encoder
        if spec is None:
            raise ConditionError(
                "This generator records no task encoder: its training conditions were given as plain tensors. Pass a "
                "training task name, a condition tensor, or task_encoder= with the encoder those conditions came from "
                "(record it for next time with LoraBank.encode_conditions or condition_encoder=encoder.to_dict())."
            )
        if isinstance(base_model, PeftModel):
            base_model = None  # its active adapter would change the hidden states; load the recorded model instead
        return load_task_encoder(spec, base_model=base_model, tokenizer=tokenizer)

    def _encode_task(self, task, task_encoder, base_model) -> torch.Tensor:
        """A description or example texts -> condition (condition_size,), with the given or the recorded encoder."""
        if task_encoder is None:
            task_encoder = self.get_task_encoder(base_model=base_model)
        else:
            recorded, given = self.config.condition_encoder or {}, task_encoder.to_dict()
            other_kind = recorded and given.get("kind") != recorded.get("kind")
            other_model = recorded and None not in (given.get("name_or_path"), recorded.get("name_or_path"))
            if other_kind or (other_model and given["name_or_path"] != recorded["name_or_path"]):
                warnings.warn(
                    f"task_encoder is {given}, but this generator's training conditions came from {recorded}. "
                    "Conditions from another encoder put the generator off its training data.",
                    stacklevel=5,
                )
        condition = task_encoder.encode(task)
        if condition.numel() != self.config.condition_size:
            raise ConditionError(
                f"The task encoder {task_encoder!r} gives {condition.numel()}-dimensional vectors, but this generator "
                f"was trained on {self.config.condition_size}-dimensional conditions. Use the encoder recorded in "
                f"generator.config.condition_encoder ({self.config.condition_encoder})."
            )
        return self._check_condition(condition.reshape(1, -1), 1)[0]

    def task_condition(self, task, *, task_encoder=None, base_model=None) -> tuple[torch.Tensor, str | None]:
        """Turn a task into its condition vector (condition_size,) and, if it has one, its name.

        A task is the name of a training task (exact match; its stored condition is used), any other string (a
        description, encoded with `task_encoder` or the generator's recorded encoder), a list of example texts (the
        in-context path, encoded the same way), or a condition tensor.
        """
        if isinstance(task, str):
            if task in self.config.task_names:
                return self.task_conditions[self.config.task_names.index(task)], task
            if task_encoder is None and self.config.condition_encoder is None:
                known = ", ".join(repr(name) for name in self.config.task_names) or "none"
                raise UnknownTaskError(
                    f"Unknown task {task!r}. This generator was trained on the tasks {known} and records no task "
                    f"encoder to embed a description with; pass one of those names, a condition tensor of size "
                    f"{self.config.condition_size}, or task_encoder=."
                )
            return self._encode_task(task, task_encoder, base_model), None
        if isinstance(task, (list, tuple)) and task and all(isinstance(text, str) for text in task):
            return self._encode_task(list(task), task_encoder, base_model), None
        if isinstance(task, torch.Tensor):
            return self._check_condition(task.reshape(1, -1) if task.dim() == 1 else task, 1)[0], None
        raise ConditionError(
            f"A task must be a task name or description (str), a list of example texts or a condition tensor, got "
            f"{type(task).__name__}."
        )

    # ---- fusion -------------------------------------------------------------------------------------------------
    @staticmethod
    def _fusion_weights(weights, count: int) -> torch.Tensor:
        """Validate fusion weights and normalise them to sum to 1. Shape (count,)."""
        if weights is None:
            return torch.full((count,), 1.0 / count)
        try:
            values = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConditionError(f"weights must be numbers, one per task, got {weights!r:.80} ({error}).") from error
        if values.numel() != count:
            raise ConditionError(f"Got {values.numel()} weights for {count} tasks; pass one weight per task.")
        if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
            raise ConditionError(
                f"Fusion weights must be finite, >= 0 and not all 0, got {values.tolist()}. They are normalised to "
                "sum to 1."
            )
        return values / values.sum()

    def _decode_mixture(self, latent: torch.Tensor, conditions: torch.Tensor, weights: torch.Tensor, combine: str):
        """One latent (1, Z), conditions (T, cond), weights (T,) -> raw flat LoRA vector (1, N)."""
        if len(conditions) == 1 or combine == "condition":  # mix the task vectors, decode once
            condition = conditions[0] if len(conditions) == 1 else (weights[:, None] * conditions.float()).sum(dim=0)
            return self.decode(latent, condition[None])
        decoded = torch.cat(  # the same z decoded under each task's condition, one at a time (T, N), normalised,
            # task memory included: each task's adapter as generate_adapter(task) writes it, so that the mix is theirs
            [self._decode_normalized(latent, self._check_condition(c[None], 1)) for c in conditions]
        )
        mixed = (weights[:, None].to(decoded) * decoded).sum(dim=0, keepdim=True)  # (1, N)
        return self.denormalize(mixed)

    # ---- generate_adapter and its steps -------------------------------------------------------------------------
    def _resolve_conditions(self, task, examples, weights, combine, task_encoder, base_model) -> _Request:
        """The task(s) of a request -> conditions, normalised fusion weights, the task's name and file metadata."""
        metadata = {}
        if examples is not None:
            tasks = [list(examples)]
            metadata["examples"] = len(examples)
            metadata["examples_sha256"] = hashlib.sha256(json.dumps(list(examples)).encode("utf-8")).hexdigest()
        else:
            tasks = list(task) if isinstance(task, (list, tuple)) else [task]
        resolved = [self.task_condition(item, task_encoder=task_encoder, base_model=base_model) for item in tasks]
        conditions = torch.stack([condition for condition, _ in resolved])  # (T, cond)
        fusion_weights = self._fusion_weights(weights, len(tasks))  # (T,)
        task_name = resolved[0][1] if len(tasks) == 1 else None
        if len(tasks) > 1 or isinstance(task, (list, tuple)):
            labels = [
                name or (item if isinstance(item, str) else "<condition>") for item, (_, name) in zip(tasks, resolved)
            ]
            metadata.update(
                fused_tasks=json.dumps(labels), fusion_weights=json.dumps(fusion_weights.tolist()), combine=combine
            )
        elif isinstance(task, str) and task_name is None:
            metadata["description"] = task
        return _Request(conditions, fusion_weights, task_name, metadata)

    def _sample_latents(self, num_samples: int, seed: int | None, temperature: float) -> torch.Tensor:
        """z ~ N(0, temperature^2 I), drawn one row at a time so that sample i is the same whatever num_samples is.
        Shape (S, Z)."""
        noise = torch.Generator().manual_seed(seed) if seed is not None else None
        latent = torch.cat([torch.randn(1, self.config.latent_size, generator=noise) for _ in range(num_samples)])
        return latent * temperature

    def _decode_samples(self, latent: torch.Tensor, request: _Request, combine: str) -> torch.Tensor:
        """Latents (S, Z) -> raw flat LoRA vectors (S, N), in eval mode, one sample at a time: batched kernels round
        differently, and sample i must not depend on num_samples."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat(
                [
                    self._decode_mixture(z[None].to(self.param_offset), request.conditions, request.weights, combine)
                    for z in latent
                ]
            )
        finally:
            self.train(was_training)

    # ---- provenance and neighbours -----------------------------------------------------------------------------
    def generator_sha256(self) -> str | None:
        """The sha256 of the integrity record of the folder this generator was loaded from (it lists the sha256 of
        every weight and config file, so it identifies the exact generator), or None for an unsaved generator or one
        whose folder has no record (saved before the integrity scheme)."""
        name = self.config.name_or_path
        if not name:
            return None
        record = Path(name) / INTEGRITY_NAME
        if not record.is_file() and not os.path.exists(name):
            try:  # a Hub repo id: the record of the snapshot from_pretrained downloaded
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(name, INTEGRITY_NAME)
                record = Path(cached) if isinstance(cached, str) else record
            except Exception:  # not a valid repo id, or no cache: no hash to record
                return None
        return sha256_file(record) if record.is_file() else None

    @property
    def similarity_name(self) -> str:
        """What the "similarity" of `condition_neighbours` is, for people reading it: a cosine, taken after
        subtracting the training tasks' mean condition when `config.memory_centered` (then 0 is "as close as the
        average task", and unrelated tasks go negative)."""
        return "centred cosine" if self.config.memory_centered else "cosine"

    def low_similarity_threshold(self) -> float:
        """Below this best cosine similarity a condition is "not close to anything in the bank": the smallest
        similarity between two different training tasks (a condition further from every task than any two tasks are
        from each other is outside what the generator saw; encoder-agnostic, unlike a fixed cut-off), or
        `FALLBACK_LOW_SIMILARITY` for a generator with one training task."""
        conditions = self.task_conditions.float()  # (T, cond)
        if len(conditions) < 2:
            return FALLBACK_LOW_SIMILARITY
        similarity = condition_similarity(conditions, conditions, self.config.memory_centered)  # (T, T)
        off_diagonal = ~torch.eye(len(conditions), dtype=torch.bool, device=similarity.device)
        return float(similarity[off_diagonal].min())

    def condition_neighbours(self, condition: torch.Tensor, top_k: int = NUM_NEIGHBOURS) -> list[dict]:
        """The training tasks nearest to a condition (condition_size,), best first: `{"task", "similarity"}` (cosine)
        and, for a generator with task memory, `"memory_weight"`, the share of that task's mean checkpoint in the
        adapter (softmax of the similarities at the learned temperature, over all tasks)."""
        conditions = self.task_conditions.float()  # (T, cond)
        if not len(conditions):
            return []
        query = condition.reshape(1, -1).float().to(conditions.device)  # (1, cond)
        similarity = condition_similarity(query, conditions, self.config.memory_centered)[0]  # (T,)
        memory_weights = None
        if getattr(self, "task_memory", None) is not None:
            memory_weights = torch.softmax(
                similarity / self.task_memory.log_temperature.detach().exp().float(), dim=-1
            )
        order = similarity.argsort(descending=True)[:top_k].tolist()
        neighbours = []
        for index in order:
            entry = {"task": self.config.task_names[index], "similarity": round(float(similarity[index]), 4)}
            if memory_weights is not None:
                entry["memory_weight"] = round(float(memory_weights[index]), 4)
            neighbours.append(entry)
        return neighbours

    def _request_neighbours(self, request: _Request) -> list[dict]:
        """Neighbours of the request's (weight-mixed) condition; a logged warning when none is close."""
        condition = (request.weights[:, None].to(request.conditions) * request.conditions.float()).sum(dim=0)
        neighbours = self.condition_neighbours(condition)
        if neighbours and request.task_name is None:
            threshold = self.low_similarity_threshold()
            if neighbours[0]["similarity"] < threshold:
                logger.warning(
                    f"The task is not close to any training task of this generator: the best {self.similarity_name} "
                    "similarity is "
                    f"{neighbours[0]['similarity']:.3f} ({neighbours[0]['task']!r}), below {threshold:.3f}, the "
                    "smallest similarity between two training tasks. Expect an adapter near the average of the bank "
                    "(a model soup); add a related task to the bank for better results."
                )
        return neighbours

    def _build_adapters(
        self, flat: torch.Tensor, request: _Request, seed: int | None, temperature: float
    ) -> list[GeneratedAdapter]:
        """Flat vectors (S, N) -> `GeneratedAdapter`s, refusing non-finite values (see `_non_finite_error`)."""
        from . import __version__

        layout = self.config.lora_layout
        neighbours = self._request_neighbours(request)
        provenance = {"peft_cvae_version": __version__}
        generator_hash = self.generator_sha256()
        if generator_hash:
            provenance["generator_sha256"] = generator_hash
        if neighbours:
            provenance["neighbours"] = json.dumps(neighbours)
        adapters = []
        for vector in flat.float().cpu():
            state_dict = layout.unflatten(vector)  # in the layout's dtype, where large values can overflow
            narrower = layout.torch_dtype not in (torch.float32, torch.float64)  # where float32 values can overflow
            if not torch.isfinite(vector).all() or (
                narrower and not all(torch.isfinite(t).all() for t in state_dict.values())
            ):
                raise self._non_finite_error(request, temperature)
            adapters.append(
                GeneratedAdapter(
                    state_dict=state_dict,
                    layout=layout,
                    task=request.task_name,
                    generator_name_or_path=self.config.name_or_path or None,
                    seed=seed,
                    temperature=temperature,
                    metadata={**request.metadata, **provenance},
                    neighbours=[dict(entry) for entry in neighbours],
                )
            )
        return adapters

    def _non_finite_error(self, request: _Request, temperature: float) -> NonFiniteError:
        """The error for a generated adapter with NaN or Inf, blaming what caused it: if the generator decodes a
        training task's mean (z = 0) to finite values, it is healthy and the request's temperature or conditions
        pushed it out of range; otherwise its weights are broken."""
        layout = self.config.lora_layout
        healthy = False
        if len(self.task_conditions):
            mean_request = _Request(self.task_conditions[:1], torch.ones(1), None)
            reference = self._decode_samples(torch.zeros(1, self.config.latent_size), mean_request, "condition")
            flat = reference[0].float().cpu()
            healthy = bool(torch.isfinite(flat).all()) and all(
                torch.isfinite(tensor).all() for tensor in layout.unflatten(flat).values()
            )
        if healthy:
            largest = request.conditions.abs().max().item()
            return NonFiniteError(
                f"The generated adapter has values beyond the range of {layout.dtype} (NaN or Inf), so it was not "
                f"written. The generator itself decodes its training tasks to finite values: the request pushed it "
                f"out of range (temperature {temperature!r}, largest condition value {largest:.3g}). Lower the "
                "temperature, or pass conditions on the scale of the training conditions."
            )
        return NonFiniteError(
            f"The generated adapter contains NaN or Inf (or values beyond the range of {layout.dtype}, the adapters' "
            "dtype), so it was not written, and so does the mean of a training task: the generator's weights or "
            "normalisation are broken (training diverged?): retrain it, e.g. with a lower learning rate or in float32."
        )

    @torch.no_grad()
    def generate_adapter(
        self,
        task=None,
        *,
        examples: list[str] | None = None,
        weights=None,
        combine: str = "condition",
        num_samples: int = 1,
        seed: int | None = None,
        temperature: float = 1.0,
        base_model=None,
        adapter_name: str = "default",
        task_encoder=None,
    ):
        """Generate LoRA adapter(s) for a task, or a weighted mix of tasks, in one forward pass of the decoder.

        Args:
            task: what to generate for: the name of a training task (exact match first), a description of a task
                (any other string; embedded with the generator's recorded task encoder), a condition tensor of size
                `condition_size`, or a LIST of those to fuse several tasks into one adapter (see `weights`).
            examples: a few example texts of one task instead of `task` (the in-context path, ICM-LoRA Eq. 1), encoded
                with the recorded encoder (normally a `HiddenStateTaskEncoder` of the base model).
            weights: one weight >= 0 per task of a `task` list (normalised to sum to 1); default: equal weights.
            combine: how a list of tasks is fused: `"condition"` mixes the condition vectors and decodes once;
                `"parameters"` decodes every task with the same latent z and mixes the decoded (normalised) LoRAs.
            num_samples: how many adapters to draw (a list is returned when > 1).
            seed: seed of the latent noise; the same seed gives bit-identical adapters.
            temperature: z ~ N(0, temperature^2 I); 0 decodes the mean (z = 0).
            base_model: if given, the adapter is loaded into it and the `PeftModel` is returned. A hidden-state task
                encoder also runs this model (before the adapter is added) instead of loading the recorded one.
            adapter_name: adapter name used with `base_model`.
            task_encoder: a `TaskEncoder` to embed descriptions and examples with, instead of the recorded one (e.g.
                `HiddenStateTaskEncoder(model, tokenizer)` when the recorded base model has no path to load from).

        Returns:
            a `GeneratedAdapter` (or a list of them), or a `peft.PeftModel` when `base_model` is given.

        Raises:
            InvalidArgumentError: a bad `num_samples`, `temperature`, `seed` or `adapter_name`.
            UnknownTaskError: a string that is no training task, and no encoder to embed it with.
            ConditionError: no task and no examples, both, an empty description, a condition of the wrong size,
                dtype or values, bad weights or `combine`.
            NonFiniteError: the generator's output is not finite (its weights are broken).
        """
        _check_generation_arguments(
            task, examples, weights, combine, num_samples, seed, temperature, base_model, adapter_name
        )
        request = self._resolve_conditions(task, examples, weights, combine, task_encoder, base_model)
        latent = self._sample_latents(num_samples, seed, float(temperature))  # (S, Z)
        flat = self._decode_samples(latent, request, combine)  # (S, N)
        adapters = self._build_adapters(flat, request, seed, temperature)
        if base_model is not None:
            return adapters[0].to_peft_model(base_model, adapter_name=adapter_name)
        return adapters[0] if num_samples == 1 else adapters
