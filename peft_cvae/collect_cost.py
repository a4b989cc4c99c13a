"""What `collect` will cost before it starts: the disk each task's checkpoints take and the time its training takes.

Disk is exact, not estimated: the kept steps follow from `steps`, `save_steps` and `last_fraction` by the rule of
`LoraCheckpointCallback`, and each checkpoint is one safetensors file of the LoRA layout's tensors (float32), whose
size is measured by serialising one all-zero checkpoint of that layout exactly as the bank writes it (tensor bytes plus
the file's JSON header). The bank adds a manifest, the condition vectors and an integrity record: a few KB.

Time is measured, not guessed: a copy of the base model gets the task's LoRA, runs `warmup_steps + timed_steps`
optimiser steps (forward, backward, AdamW) on the first batches of the first task, and the mean of the timed steps
times `steps` is the estimate per task. It is a lower bound of a sort: the Trainer adds its bookkeeping and the
checkpoint copies (milliseconds each), and example tasks whose batches are shorter or longer than the first task's
train faster or slower. On a shared machine the estimate is only as steady as the machine's load. The estimate says
which task and how many steps it was measured on.
"""

import copy
import time
from dataclasses import dataclass

import torch

from .errors import InvalidConfigError

__all__ = ["CollectCost", "estimate_collect_cost", "kept_steps"]


def kept_steps(steps: int, save_steps: int, last_fraction: float) -> list[int]:
    """The optimiser steps whose checkpoints `collect` keeps for one task (`LoraCheckpointCallback`'s rule: every
    `save_steps`-th step of the last `last_fraction` of training, and always the final step)."""
    from .callbacks import LoraCheckpointCallback

    first = LoraCheckpointCallback(None, "task", save_steps=save_steps, last_fraction=last_fraction).first_kept_step(
        steps
    )
    return [step for step in range(1, steps + 1) if step == steps or (step >= first and step % save_steps == 0)]


@dataclass
class CollectCost:
    """The cost of collecting one task, and of all of them."""

    num_tasks: int
    steps: list[int]  # kept optimiser steps of each task
    numbers_per_checkpoint: int  # LoRA parameters (A and B of every adapted module)
    bytes_per_number: int
    bytes_per_checkpoint: int  # one checkpoint file: tensor bytes + safetensors header
    seconds_per_step: float | None  # measured; None when not measured
    measured_on: str | None  # which task and how many timed steps
    steps_per_task: int

    @property
    def checkpoints_per_task(self) -> int:
        return len(self.steps)

    @property
    def bytes_per_task(self) -> int:
        return self.bytes_per_checkpoint * self.checkpoints_per_task

    @property
    def seconds_per_task(self) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * self.steps_per_task

    def describe(self) -> str:
        """The lines `peft-cvae collect` prints before it starts."""
        from .commands.utils import human_size

        steps = self.steps
        kept = f"steps {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        lines = [
            f"Cost per task: {self.checkpoints_per_task} checkpoints kept ({kept}) x "
            f"{human_size(self.bytes_per_checkpoint)} = {human_size(self.bytes_per_task)} on disk (exact: "
            f"{self.numbers_per_checkpoint:,} LoRA numbers x {self.bytes_per_number} bytes + header per checkpoint)"
        ]
        if self.seconds_per_task is not None:
            lines.append(
                f"  training: about {_duration(self.seconds_per_task)} ({self.steps_per_task} steps x "
                f"{self.seconds_per_step:.2f} s, measured on {self.measured_on})"
            )
        total = f"Total for {self.num_tasks} task(s): {human_size(self.bytes_per_task * self.num_tasks)}"
        if self.seconds_per_task is not None:
            total += f", about {_duration(self.seconds_per_task * self.num_tasks)} of training"
        lines.append(total)
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def estimate_collect_cost(base_model, tokenizer, tasks, args, *, timed_steps: int = 2, warmup_steps: int = 1):
    """The `CollectCost` of `collect_bank(base_model, tokenizer, tasks, args)`, without training any task.

    Args:
        base_model: the causal LM (not modified: a copy gets the LoRA).
        tokenizer: its tokenizer.
        tasks: the `TaskData` to collect; the time is measured on the first.
        args: the `CollectArguments`.
        timed_steps: optimiser steps timed (0: disk only, no time estimate).
        warmup_steps: steps run first and not timed (the first step allocates the optimiser state and the caches).
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    from .collect import _pad_token_id, _RightPadCollator, task_dataset

    if not tasks:
        raise InvalidConfigError("tasks must be a non-empty list of TaskData.")
    if isinstance(timed_steps, bool) or not isinstance(timed_steps, int) or timed_steps < 0:
        raise InvalidConfigError(f"timed_steps must be a non-negative integer, got {timed_steps!r}.")
    model = get_peft_model(copy.deepcopy(base_model), args.lora_config())
    state_dict = {key: torch.zeros_like(value, dtype=torch.float32) for key, value in
                  get_peft_model_state_dict(model).items()}  # fmt: skip
    numbers = sum(tensor.numel() for tensor in state_dict.values())
    file_bytes = len(save(state_dict, metadata={"format": "pt"}))  # as `write_safetensors` writes each checkpoint
    seconds_per_step = None
    measured_on = None
    if timed_steps:
        task = tasks[0]
        dataset = task_dataset(task, tokenizer, args.max_length)
        collator = _RightPadCollator(_pad_token_id(tokenizer))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the Trainer will train
        model.to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        durations = []
        for index in range(warmup_steps + timed_steps):
            rows = [dataset[(index * args.batch_size + row) % len(dataset)] for row in range(args.batch_size)]
            batch = {key: value.to(device) for key, value in collator(rows).items()}
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            durations.append(time.perf_counter() - start)
        seconds_per_step = sum(durations[warmup_steps:]) / timed_steps
        measured_on = f"{timed_steps} timed step(s) of task {task.name!r} on this machine"
    del model
    return CollectCost(
        num_tasks=len(tasks),
        steps=kept_steps(args.steps, args.checkpoint_every, args.last_fraction),
        numbers_per_checkpoint=numbers,
        bytes_per_number=4,  # the bank stores float32 checkpoints (LoraCheckpointCallback)
        bytes_per_checkpoint=file_bytes,
        seconds_per_step=seconds_per_step,
        measured_on=measured_on,
        steps_per_task=args.steps,
    )
