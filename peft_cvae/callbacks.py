"""`LoraCheckpointCallback`: collect LoRA checkpoints into a `LoraBank` while a `transformers.Trainer` trains.

A generator learns from many checkpoints per task, and the paper keeps those of the last part of training (the last
50 of 150 epochs), where the LoRA has settled near a solution. Instead of writing dozens of adapter folders and
reading them back, add this callback to the Trainer of each task: it copies the adapter's PEFT state dict (the same
tensors `PeftModel.save_pretrained` would write) straight into a bank, tagged with the task, the optimiser step and
the task's description.

    bank = None
    for task, dataset in datasets.items():
        model = get_peft_model(base_model(), lora_config)
        callback = LoraCheckpointCallback(bank, task, description=descriptions[task], save_steps=10)
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
        bank = callback.bank  # created from the first model's layout; the next tasks add to it
    bank.save_pretrained("my-bank")

Under DeepSpeed ZeRO-3 or FSDP with sharded parameters each process holds only part of every LoRA tensor, so the
state dict read here would be incomplete; collect checkpoints from data-parallel (DDP) or single-process runs.
"""

import math
import os

import torch
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .data import LoraBank
from .errors import InvalidConfigError, UnsupportedAdapterError
from .layout import LoraLayout

__all__ = ["LoraCheckpointCallback"]


class LoraCheckpointCallback(TrainerCallback):
    """A `transformers.TrainerCallback` adding the LoRA checkpoints of the last part of training to a `LoraBank`.

    When it saves:
        - With `save_steps=N`, after every optimiser step whose number (`state.global_step`, counting optimiser steps,
          so one step per `gradient_accumulation_steps` batches) is a multiple of N.
        - With `save_steps=None`, at the end of every epoch.
        - In both cases only in the last `last_fraction` of training: a step `s` of a run of `max_steps` optimiser
          steps qualifies when `s > max_steps - floor(max_steps * last_fraction)`. With 150 epochs and
          `last_fraction=1/3` that is epochs 101 to 150, as in ICM-LoRA.
        - Always at the final step (also when training stops early, e.g. through `EarlyStoppingCallback`), once. An
          early stop is noticed only when training ends, so with `load_best_model_at_end=True` that last checkpoint
          holds the best model the Trainer reloaded. A run resumed with `resume_from_checkpoint` collects only the
          steps it runs.

    Each checkpoint is a detached float32 copy on the CPU of `peft.get_peft_model_state_dict(model)`, added with
    `bank.add_checkpoint(task, state_dict, step=global_step)`. Nothing is written to disk during training; with
    `output_dir` the whole bank is saved there (safetensors + JSON, atomically) at the end of training, by the main
    process only.

    Args:
        bank: the bank to add to, or `None` to create one from the model's LoRA layout when training begins (read it
            afterwards from `callback.bank`). Use the same bank for successive Trainer runs to collect several tasks.
        task: name of the task whose checkpoints these are.
        description: a text describing the task, stored in the bank (a text task encoder can turn it into the
            condition later).
        condition: the task's condition vector (1-D), stored with `bank.set_condition`. It can also be set later.
        save_steps: save every this many optimiser steps, or at every epoch end when `None`.
        last_fraction: the final share of training (0 < last_fraction <= 1) in which checkpoints are kept.
        output_dir: if given, the bank is saved to this folder when training ends.
        adapter_name: which adapter of the `PeftModel` to collect; the active adapter by default.
    """

    def __init__(
        self,
        bank: LoraBank | None,
        task: str,
        *,
        description: str | None = None,
        condition: torch.Tensor | None = None,
        save_steps: int | None = None,
        last_fraction: float = 1 / 3,
        output_dir: str | os.PathLike | None = None,
        adapter_name: str | None = None,
    ):
        if not isinstance(task, str) or not task:
            raise InvalidConfigError(f"task must be a non-empty string naming the task, got {task!r}.")
        if save_steps is not None and (
            isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 1
        ):
            raise InvalidConfigError(
                f"save_steps must be a positive integer (save every N optimiser steps) or None (save at every "
                f"epoch end), got {save_steps!r}."
            )
        if not isinstance(last_fraction, (int, float)) or not 0 < last_fraction <= 1:
            raise InvalidConfigError(
                f"last_fraction must be in (0, 1] (the final share of training whose checkpoints are kept; the paper "
                f"keeps the last 50 of 150 epochs, i.e. 1/3), got {last_fraction!r}."
            )
        if bank is not None and not isinstance(bank, LoraBank):
            raise InvalidConfigError(f"bank must be a LoraBank or None, got a {type(bank).__name__}.")
        self.bank = bank
        self.task = task
        self.description = description
        self.condition = condition
        self.save_steps = save_steps
        self.last_fraction = float(last_fraction)
        self.output_dir = output_dir
        self.adapter_name = adapter_name
        self.saved_steps: list[int] = []  # optimiser steps collected in the current (or last) run

    # ---- which steps --------------------------------------------------------------------------------------------
    def first_kept_step(self, max_steps: int) -> int:
        """The first optimiser step of a `max_steps`-step run that lies in the kept last fraction of training."""
        kept = max(1, math.floor(max_steps * self.last_fraction + 1e-9))
        return max_steps - kept + 1

    def _in_kept_fraction(self, state: TrainerState) -> bool:
        return state.global_step >= self.first_kept_step(state.max_steps)

    # ---- events -------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Check the model is a LoRA `PeftModel`, and create the bank (or check it matches the model's layout)."""
        model, adapter_name = self._peft_model(kwargs.get("model"))
        lora_config = model.peft_config[adapter_name]
        if self.bank is None:
            library = LoraLayout.from_peft_model(model, adapter_name).library  # "diffusers" for a UNet
            state_dict = self._state_dict(model, adapter_name)  # float32, so the bank's layout says float32
            self.bank = LoraBank(LoraLayout.from_state_dict(state_dict, lora_config, library=library))
        else:
            self.bank.layout.check_config(lora_config)
            self.bank.layout.check(get_peft_model_state_dict(model, adapter_name=adapter_name))
        if self.condition is not None:
            self.bank.set_condition(self.task, self.condition, description=self.description)
        elif self.description is not None:
            self.bank.set_description(self.task, self.description)
        self.saved_steps = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        final = state.global_step >= state.max_steps
        periodic = self.save_steps is not None and state.global_step % self.save_steps == 0
        if final or (periodic and self._in_kept_fraction(state)):
            self._save(kwargs.get("model"), state.global_step)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.save_steps is None and self._in_kept_fraction(state):
            self._save(kwargs.get("model"), state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Keep the final step if training stopped early, then save the bank to `output_dir` (main process only)."""
        if not self.saved_steps or self.saved_steps[-1] != state.global_step:
            self._save(kwargs.get("model"), state.global_step)
        if self.output_dir is not None and state.is_world_process_zero:
            self.bank.save_pretrained(self.output_dir)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _save(self, model, step: int) -> None:
        if self.saved_steps and self.saved_steps[-1] == step:
            return  # the final step is also an epoch end or a multiple of save_steps
        model, adapter_name = self._peft_model(model)
        self.bank.add_checkpoint(self.task, self._state_dict(model, adapter_name), step=step)
        self.saved_steps.append(step)

    @staticmethod
    def _state_dict(model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's PEFT state dict as float32 CPU tensors (`add_checkpoint` stores its own detached clones)."""
        return {
            key: value.detach().float().cpu()
            for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
        }

    def _peft_model(self, model) -> tuple[PeftModel, str]:
        model = extract_model_from_parallel(model) if model is not None else None
        if not isinstance(model, PeftModel):
            raise UnsupportedAdapterError(
                f"LoraCheckpointCallback needs the Trainer's model to be a peft.PeftModel with a LoRA adapter, got "
                f"{type(model).__name__}. Wrap the model first: model = peft.get_peft_model(model, LoraConfig(...))."
            )
        adapter_name = self.adapter_name or model.active_adapter
        if adapter_name not in model.peft_config:
            raise UnsupportedAdapterError(
                f"The PeftModel has no adapter named {adapter_name!r}; it has {sorted(model.peft_config)}. Pass one "
                "of those as adapter_name."
            )
        peft_type = model.peft_config[adapter_name].peft_type
        peft_type = str(getattr(peft_type, "value", peft_type))  # a PeftType enum
        if peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"Adapter {adapter_name!r} is a {peft_type} adapter; LoraCheckpointCallback collects LoRA adapters "
                "only. Train with peft.LoraConfig."
            )
        return model, adapter_name
