"""`FunctionalLoss`: the answer NLL of generated LoRAs applied to the frozen base model (Text-to-LoRA's "SFT mode").

A generator trained only to reconstruct checkpoints can at best mix them; the loss that matters is what the LoRA
does. `FunctionalLoss` takes decoded flat LoRA vectors (B, N), puts each one into the base model's LoRA layers with
`torch.func.functional_call` (no in-place weight swap: the vector stays in the autograd graph, the base weights are
frozen), and returns the mean answer NLL of a few of each sample's task's training examples. `train_generator(...,
functional_loss=FunctionalLoss(...))` adds `weight` x this NLL to the CVAE loss.

* The LoRA layers are PEFT's own (`get_peft_model` with the layout's `LoraConfig`), so the scaling (`lora_alpha / r`,
  rsLoRA, ...) is applied exactly as when the adapter is loaded with `PeftModel.from_pretrained`.
* The examples are tokenised by `peft_cvae.collect` (answer-only labels, the tokenizer's `sequence_prefix`, right
  padding), and the loss is `collect.answer_loss`: the same objective each bank LoRA was trained on.
* Which examples a sample gets depends only on `seed`, the training step and the sample's row in the global batch,
  so a run is reproducible and a resumed run draws the examples the uninterrupted run would.

Cost: one forward and backward pass of the base model over `examples_per_task` examples per generated LoRA per step
(the generator itself is far cheaper). Each sample is a separate pass: the LoRAs differ, so the batch cannot be
stacked into one base-model call. Memory: the base model's graph of one sample at a time. Each sample's backward pass
runs inside the call and the graph is freed before the next sample's pass, so the activations held are those of
`examples_per_task` examples, not of the whole batch's (B times fewer): on the full BIG-bench preset, a process that
held the graph of 8 samples x 2 examples of 257 tokens through SmolLM2-135M grew to 9 GB and was killed for memory.
"""

import copy
import hashlib

import torch
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

from .collect import _ExampleDataset, _pad_token_id, _RightPadCollator, answer_loss, quiet_libraries
from .errors import InvalidConfigError, LayoutMismatchError, UnknownTaskError
from .task_data import TaskData

__all__ = ["FunctionalLoss"]

ADAPTER_NAME = "default"


class FunctionalLoss:
    """The answer NLL of flat LoRA vectors applied to a frozen base model, differentiable w.r.t. the vectors.

    Args:
        base_model: the causal LM the bank's LoRAs were trained on (not modified: a copy gets the LoRA layers).
        tokenizer: its tokenizer.
        tasks: the training tasks' data, `{bank task name: TaskData}` or a list of `TaskData` (keyed by `.name`); every
            task needs prompt/answer `examples`.
        layout: the bank's `LoraLayout` (`bank.layout` or `generator.config.lora_layout`).
        examples_per_task: examples scored per generated LoRA at each call.
        max_length: tokens per example (a longer one loses the start of its prompt, as in `collect`).
        weight: the factor of this loss in `train_generator`'s total loss.
        seed: the seed of the example draws.
        on_generated: score what the generator writes for each sample's condition at z = 0 (what `generate_adapter`
            returns, the sample's task hidden from the task memory as `memory_holdout` draws it: an unseen task's
            situation) instead of the reconstruction of the sample's checkpoint, which the encoder saw.
        offset_lr: the learning rate of the generator's `functional_offset` (`PeftCVAEConfig.functional_offset`),
            in raw LoRA units like a LoRA's own (e.g. the one its bank was trained with); None: the generator's.

    Example:
        ```python
        functional = FunctionalLoss(base, tokenizer, {task.name: task for task in tasks}, bank.layout, weight=0.1)
        history = train_generator(generator, bank, functional_loss=functional, epochs=30)
        history[-1]["functional_loss"]  # the epoch's mean answer NLL of the decoded LoRAs
        ```
    """

    def __init__(
        self, base_model, tokenizer, tasks, layout, *, examples_per_task: int = 4, max_length: int = 128,
        weight: float = 1.0, seed: int = 0, on_generated: bool = False, offset_lr: float | None = None,
    ):  # fmt: skip
        for name, value in (("examples_per_task", examples_per_task), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise InvalidConfigError(f"weight must be a number >= 0, got {weight!r}.")
        on_generated, offset_lr = _offset_options(on_generated, offset_lr)
        if isinstance(tasks, (list, tuple)):
            tasks = {task.name: task for task in tasks}
        if not isinstance(tasks, dict) or not tasks or not all(isinstance(t, TaskData) for t in tasks.values()):
            raise InvalidConfigError("tasks must be a non-empty {task name: TaskData} dict or list of TaskData.")
        documents = sorted(name for name, task in tasks.items() if not task.examples)
        if documents:
            raise InvalidConfigError(
                f"Tasks {documents} have no prompt/answer examples; the functional loss scores the answers of a "
                "task's examples. Give those tasks `examples` (or leave them out of the bank)."
            )
        self.layout = layout
        self.examples_per_task = examples_per_task
        self.max_length = max_length
        self.weight = float(weight)
        self.seed = seed
        self.on_generated, self.offset_lr = on_generated, offset_lr
        with quiet_libraries():
            model = get_peft_model(copy.deepcopy(base_model), layout.peft_config(), adapter_name=ADAPTER_NAME)
        self.model = model.eval().requires_grad_(False)  # eval: no dropout; the vectors are the only variables
        self.parameter_names = _parameter_names(self.model, layout)  # layout key order
        self.collate = _RightPadCollator(_pad_token_id(tokenizer))
        with quiet_libraries():
            self.examples = {name: _ExampleDataset(task, tokenizer, max_length).items for name, task in tasks.items()}

    def with_options(self, *, on_generated: bool, offset_lr: float | None) -> "FunctionalLoss":
        """This loss with other `on_generated` / `offset_lr`, sharing its base-model copy and tokenized examples (the
        expensive parts; the examples a step draws depend only on the seed, task, step and row, so two losses that
        share them never disturb each other). This one is left as it is."""
        other = copy.copy(self)
        other.on_generated, other.offset_lr = _offset_options(on_generated, offset_lr)
        return other

    def to(self, device) -> "FunctionalLoss":
        """Move the base model (train_generator moves it to the accelerator's device)."""
        self.model.to(device)
        return self

    def settings(self) -> dict:
        """What determines the loss, for the training run's record (scalars: trackers such as tensorboard take only
        scalar hyperparameters)."""
        return {
            "functional_loss_weight": self.weight,
            "functional_loss_examples_per_task": self.examples_per_task,
            "functional_loss_max_length": self.max_length,
            "functional_loss_seed": self.seed,
            "functional_loss_on_generated": self.on_generated,
            "functional_offset_lr": -1.0 if self.offset_lr is None else self.offset_lr,  # -1: the generator's lr
        }

    def check_generator(self, generator) -> None:
        """Raise unless `generator` writes this layout and every one of its tasks has examples here."""
        layout = generator.config.lora_layout
        if layout.keys != self.layout.keys or layout.shapes != self.layout.shapes:
            raise LayoutMismatchError(
                "The functional loss was built for another LoRA layout than the generator's (other base model, rank "
                "or target modules). Build it with layout=generator.config.lora_layout and the same base model."
            )
        layout.check_config(self.layout.lora_config)  # the same alpha, rsLoRA, ...: the same scaling
        missing = sorted(set(generator.config.task_names) - set(self.examples))
        if missing:
            raise UnknownTaskError(
                f"The generator's tasks {missing} have no examples in the functional loss; pass a TaskData for every "
                "bank task (tasks={name: TaskData}), keyed by the bank's task names."
            )

    def __call__(self, vectors: torch.Tensor, tasks: list[str], *, step: int = 0, first_row: int = 0) -> torch.Tensor:
        """Mean over the B samples of the answer NLL (per answer token) of `examples_per_task` examples of each
        sample's task, with that sample's LoRA applied. `vectors` (B, N) raw flat LoRA vectors (as `decode` gives);
        `tasks` B task names; `step` and `first_row` (the first sample's row in the global batch) pick the examples.
        Returns a scalar tensor, differentiable w.r.t. `vectors`."""
        if vectors.dim() != 2 or vectors.shape[1] != self.layout.numel or len(tasks) != vectors.shape[0]:
            raise LayoutMismatchError(
                f"Expected flat LoRA vectors (B, {self.layout.numel}) and B task names, got {tuple(vectors.shape)} "
                f"and {len(tasks)} names."
            )
        unknown = sorted(set(tasks) - set(self.examples))
        if unknown:
            raise UnknownTaskError(
                f"Tasks {unknown} have no examples in the functional loss; known: {sorted(self.examples)}."
            )
        draws = [self._draw(task, step, first_row + row) for row, task in enumerate(tasks)]
        if not (torch.is_grad_enabled() and vectors.requires_grad):
            return torch.stack([self.task_nll(vector, items) for vector, items in zip(vectors, draws)]).mean()
        # One sample's base-model graph at a time: its NLL and the gradient w.r.t. its vector are computed here and
        # the graph freed; a surrogate whose value is the NLL and whose gradient w.r.t. the vector is that gradient
        # carries it into the generator's graph when the caller runs backward.
        surrogates = []
        for vector, items in zip(vectors, draws):
            leaf = vector.detach().requires_grad_(True)
            nll = self.task_nll(leaf, items)
            (gradient,) = torch.autograd.grad(nll, leaf)
            surrogates.append(nll.detach() + ((vector - vector.detach()) * gradient).sum())
        return torch.stack(surrogates).mean()

    def task_nll(self, vector: torch.Tensor, items: list[dict]) -> torch.Tensor:
        """Answer NLL (mean over answer tokens) of the tokenised examples `items` with the flat LoRA `vector` (N,)."""
        batch = self.collate(items)
        device = next(self.model.parameters()).device
        batch = {name: value.to(device) for name, value in batch.items()}
        parameters = self.lora_parameters(vector)

        def forward(**inputs):
            return torch.func.functional_call(self.model, parameters, args=(), kwargs=inputs)

        loss, _ = answer_loss(forward, batch)
        return loss

    def lora_parameters(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{PeftModel parameter name: tensor}` of a flat LoRA vector (N,), views of it (no copy unless a cast)."""
        pieces = vector.split(self.layout.sizes)
        model_parameters = dict(self.model.named_parameters())
        return {
            name: piece.reshape(shape).to(model_parameters[name].dtype)
            for name, piece, shape in zip(self.parameter_names, pieces, self.layout.shapes)
        }

    def _draw(self, task: str, step: int, row: int) -> list[dict]:
        """`examples_per_task` distinct examples of `task` (all of them if it has fewer), from (seed, step, row)."""
        items = self.examples[task]
        digest = hashlib.sha256(f"{self.seed}/{step}/{row}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        order = torch.randperm(len(items), generator=generator)[: self.examples_per_task]
        return [items[index] for index in order.tolist()]


def _offset_options(on_generated, offset_lr) -> tuple[bool, float | None]:
    """The two options checked, offset_lr as a float (or None)."""
    if offset_lr is not None and (
        isinstance(offset_lr, bool) or not isinstance(offset_lr, (int, float)) or not 0 < offset_lr < float("inf")
    ):
        raise InvalidConfigError(f"offset_lr must be a positive number or None, got {offset_lr!r}.")
    if not isinstance(on_generated, bool):
        raise InvalidConfigError(f"on_generated must be true or false, got {on_generated!r}.")
    return on_generated, None if offset_lr is None else float(offset_lr)


def _parameter_names(model, layout) -> list[str]:
    """The `PeftModel` parameter name of each layout key (its saved form plus the adapter name, as PEFT's
    `set_peft_model_state_dict` inserts it); raises if a key has no parameter or a LoRA parameter no key."""
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_config[ADAPTER_NAME].peft_type]
    renamed = _insert_adapter_name_into_state_dict(dict.fromkeys(layout.keys), ADAPTER_NAME, prefix)
    names = list(renamed)  # insertion order: the layout's key order
    parameters = {name for name, _ in model.named_parameters()}
    missing = [key for key, name in zip(layout.keys, names) if name not in parameters]
    lora = {name for name in parameters if prefix in name and f".{ADAPTER_NAME}" in name}
    extra = sorted(lora - set(names))
    if missing or extra:
        raise LayoutMismatchError(
            f"The base model's LoRA layers do not match the layout: {len(missing)} layout tensors have no parameter "
            f"(e.g. {missing[:1]}), {len(extra)} LoRA parameters have no layout tensor (e.g. {extra[:1]}). Pass the "
            "base model the bank's LoRAs were trained on."
        )
    return names
