"""`collect_bank`: fine-tune one LoRA per task with a `transformers.Trainer` and collect its checkpoints into a bank.

(About 440 lines, over the project's ~400: the arguments, the two token datasets and the Trainer loop are the one
fine-tuning path and change together; the task data itself lives in `task_data.py`.)

This is the one LoRA fine-tuning path of peft-cvae: `peft-cvae collect`, the benchmarks and the examples all call it.
Each task gets the same LoRA initialisation (`torch.manual_seed(args.seed)` before `get_peft_model`), so the
generator models what differs between tasks, not the random start; a `LoraCheckpointCallback` keeps the checkpoints
of the last part of training (cosine decay to 0: a converged tail, DESIGN §7) in the bank.

Two kinds of task data (`peft_cvae.task_data.TaskData`):

* documents (`texts`): joined with EOS and cut into blocks of `max_length` tokens; the loss is on every token;
* prompt/answer pairs (`examples`): `prompt + answer + EOS`, right-padded per batch; the loss is on the answer tokens
  only (labels -100 on the prompt and the padding). A pair longer than `max_length` loses the *start* of its prompt,
  so the answer is always kept whole.

Example:
    ```python
    from peft_cvae.collect import CollectArguments, TaskData, collect_bank

    tasks = [TaskData("sport", "match reports", texts=sport_texts), TaskData("sums", "adding", examples=pairs)]
    bank = collect_bank(base_model, tokenizer, tasks, CollectArguments(steps=200, lora_r=8))
    bank.save_pretrained("my-bank")
    ```
"""

import contextlib
import copy
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from .callbacks import LoraCheckpointCallback
from .errors import InvalidConfigError
from .task_data import TaskData, TaskExample, check_task_name, read_task_spec

__all__ = [
    "CollectArguments",
    "TaskData",
    "TaskExample",
    "TaskLora",
    "check_task_name",
    "collect_bank",
    "quiet_libraries",
    "read_task_spec",
    "train_task_lora",
]

logger = logging.getLogger(__name__)

CONDITIONS = ("text", "in-context")
SMOOTHING_SHARE = 0.1  # the reported loss is the mean of the last 10% of the logged per-step losses
DEFAULT_LAST_FRACTION = 1 / 3
TAIL_STEPS = 40  # the converged-tail recipe keeps every step of the last 40 (DESIGN §7: ~40 checkpoints per task)
DEFAULT_RECIPE = "converged-tail"
RECIPES = {
    "converged-tail": "keep every optimiser step of the last 40 (save_steps=1, last_fraction=40/steps): ~40 "
    "checkpoints per task on the cosine-decayed tail of training, as the run of record in docs/benchmarks.md",
    "sparse-tail": "keep every (steps/20)-th step of the last third (save_steps=steps/20, last_fraction=1/3): 7 "
    "checkpoints per task (at 60 steps: every 3rd of steps 42-60), a sixth of the disk (the default before "
    "converged-tail)",
}


@dataclass
class CollectArguments:
    """How each task's LoRA is fine-tuned and which of its checkpoints are kept (the flags of `peft-cvae collect`)."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 * r)"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "modules to adapt"}
    )
    # Sized for small tasks on a CPU (issue 16: four domains of 40 texts, from text files to evaluated adapters, in
    # about 12 min on 2 cores, docs/benchmarks_tutorial_path.md): 60 steps of 4 blocks of 128 tokens, about 30k tokens
    # per task. The defaults before, 120 steps of 8 at lr 2e-4, trained on 4x the tokens: 38 min of collect alone.
    steps: int = field(default=60, metadata={"help": "optimiser steps per task"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate, cosine decay to 0"})
    batch_size: int = field(default=4, metadata={"help": "blocks (or examples) per step"})
    max_length: int = field(default=128, metadata={"help": "tokens per block (or per example)"})
    # save_steps and last_fraction default to None: the recipe fills them in, and a value given explicitly (even the
    # value a recipe would pick) always wins.
    save_steps: int | None = field(
        default=None, metadata={"help": "keep a checkpoint every N steps (default: the recipe's)"}
    )
    last_fraction: float | None = field(
        default=None,
        metadata={"help": "keep checkpoints of this final share of training (default: the recipe's; ICM-LoRA keeps "
                  "the last 50 of 150 epochs)"},
    )  # fmt: skip
    recipe: str = field(
        default=DEFAULT_RECIPE,
        metadata={
            "help": "a preset of the checkpoint flags; converged-tail: " + RECIPES["converged-tail"] + "; "
            "sparse-tail: " + RECIPES["sparse-tail"] + ". --save-steps or --last-fraction given explicitly win",
            "choices": list(RECIPES),
        },
    )
    condition: str = field(
        default="text",
        metadata={
            "help": "task vectors from descriptions (a sentence encoder) or from a few of the task's texts run "
            "through the base model (ICM-LoRA Eq. 1)",
            "choices": list(CONDITIONS),
        },
    )
    text_encoder: str | None = field(
        default=None, metadata={"help": "sentence encoder folder or Hub id (default: all-MiniLM-L6-v2)"}
    )
    num_examples: int = field(default=8, metadata={"help": "texts per task for --condition in-context"})
    bf16: bool = field(default=False, metadata={"help": "train under bfloat16 autocast"})
    seed: int = field(default=0, metadata={"help": "random seed (data order and the shared LoRA initialisation)"})
    save_adapters: str | None = field(
        default=None, metadata={"help": "also write each task's final LoRA to FOLDER/<task>"}
    )
    start_adapter: str | None = field(
        default=None,
        metadata={
            "help": "a PEFT LoRA adapter (folder or Hub id) every task's LoRA starts from instead of the shared "
            "random initialisation, e.g. a multi-task LoRA of all the tasks: the bank's LoRAs then differ from one "
            "trained start. Its rank, alpha and target modules must be this run's"
        },
    )

    def __post_init__(self):
        for name in ("lora_r", "steps", "batch_size", "max_length", "num_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.recipe is None:  # configs written when the field could be None: no preset, the old defaults
            self.recipe = "sparse-tail"
        if self.recipe not in RECIPES:
            raise InvalidConfigError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}.")
        self._apply_recipe()
        if self.save_steps is not None and (
            isinstance(self.save_steps, bool) or not isinstance(self.save_steps, int) or self.save_steps < 1
        ):
            raise InvalidConfigError(
                f"save_steps must be a positive integer or None (the recipe decides), got {self.save_steps!r}."
            )
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0)):
                raise InvalidConfigError(f"{name} must be a positive number, got {value!r}.")
        if not isinstance(self.last_fraction, (int, float)) or not 0 < self.last_fraction <= 1:
            raise InvalidConfigError(
                f"last_fraction must be in (0, 1] (the final share of training whose checkpoints are kept), got "
                f"{self.last_fraction!r}."
            )
        if self.condition not in CONDITIONS:
            raise InvalidConfigError(f"condition must be one of {CONDITIONS}, got {self.condition!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
            raise InvalidConfigError(
                f"target_modules must be a non-empty list of module names, got {self.target_modules!r}."
            )

    def _apply_recipe(self) -> None:
        """Fill in the recipe's values of the checkpoint fields left as None (a value set explicitly wins)."""
        if self.recipe == "converged-tail":
            if self.save_steps is None:
                self.save_steps = 1
            if self.last_fraction is None:
                self.last_fraction = min(1.0, TAIL_STEPS / self.steps)
        elif self.last_fraction is None:  # sparse-tail; save_steps stays None: checkpoint_every gives steps / 20
            self.last_fraction = DEFAULT_LAST_FRACTION

    @property
    def checkpoint_every(self) -> int:
        """`save_steps`, or `max(1, steps // 20)` when it is None (the sparse-tail recipe)."""
        return self.save_steps if self.save_steps is not None else max(1, self.steps // 20)

    def lora_config(self):
        """The `peft.LoraConfig` of every task's LoRA (alpha 2 r unless set; no dropout)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r,
            target_modules=list(self.target_modules),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )


@dataclass
class TaskLora:
    """What `train_task_lora` returns: the bank with the task's kept checkpoints, the trained model and a summary."""

    bank: object  # LoraBank
    model: object  # peft.PeftModel, the task's LoRA after the last step
    steps: list[int]  # optimiser steps of the kept checkpoints
    train_seconds: float
    loss: float | None  # mean of the last 10% of logged per-step training losses (one noisy batch says little)
    num_sequences: int  # training blocks (documents) or examples
    held_out_perplexity: tuple[float, float] | None = None  # (before, after) on the task's test_texts, if it has any
    resumed_from: int | None = None  # the optimiser step a `resume_dir` run continued from (None: it started fresh)


# ---- datasets ------------------------------------------------------------------------------------------------------
def sequence_prefix(tokenizer, text: str = "a") -> list[int]:
    """The special tokens the tokenizer puts in front of every text (Gemma's `<bos>`, Llama 3's
    `<|begin_of_text|>`; none for SmolLM2 or GPT-2): what the model saw at the start of every sequence in training.

    Gemma-3 without its `<bos>` is a different model (measured on Gemma-3-270M, BBC sport text, 48-token windows:
    loss 6.5-9.0 without, 2.8-4.7 with), so every training block and example starts with this prefix. Found by
    tokenizing `text` (one of the task's own, so any tokenizer can) with and without special tokens."""
    with_specials = list(tokenizer(text)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(with_specials) - len(plain) + 1):
        if plain and with_specials[start : start + len(plain)] == plain:
            return with_specials[:start]
    return []


class _ChunkDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks of a task's texts (documents joined by EOS), for causal-LM training; each block
    starts with the tokenizer's `sequence_prefix` (nothing for most tokenizers, `<bos>` for Gemma)."""

    def __init__(self, texts: list[str], tokenizer, max_length: int, task: str):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        prefix = sequence_prefix(tokenizer, texts[0]) if texts else []
        width = max_length - len(prefix)  # text tokens per block
        usable = len(ids) // width * width if width > 0 else 0
        if usable == 0:
            raise InvalidConfigError(
                f"Task {task!r} has only {len(ids)} tokens, fewer than one training block of --max-length "
                f"{max_length} (of which {len(prefix)} are the tokenizer's start tokens). Add text or raise or lower "
                "--max-length."
            )
        blocks = torch.tensor(ids[:usable]).view(-1, width)  # (num_blocks, width)
        start = torch.tensor(prefix, dtype=blocks.dtype).expand(blocks.shape[0], len(prefix))
        self.blocks = torch.cat([start, blocks], dim=1)  # (num_blocks, max_length)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


class _ExampleDataset(torch.utils.data.Dataset):
    """Prompt/answer pairs as token ids with labels -100 on the prompt, so the loss is on the answer only.

    Prompt and answer are tokenized separately (the answer's tokens are exactly `tokenizer(target)`, as a scorer that
    compares answers sees them), then joined, with EOS after the answer. Too long a pair loses the start of its prompt.
    """

    def __init__(self, task: TaskData, tokenizer, max_length: int):
        self.items = []
        truncated = 0
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prefix = sequence_prefix(tokenizer, task.prompt(task.examples[0])) if task.examples else []
        budget = max_length - len(prefix)
        for example in task.examples:
            prompt = tokenizer(task.prompt(example), add_special_tokens=False)["input_ids"]
            answer = tokenizer(example.target, add_special_tokens=False)["input_ids"] + eos
            if len(prompt) + len(answer) > budget:
                truncated += 1
                answer = answer[:budget]
                prompt = prompt[len(prompt) - (budget - len(answer)) :] if len(answer) < budget else []
            ids = torch.tensor(prefix + prompt + answer)
            labels = ids.clone()
            labels[: len(prefix) + len(prompt)] = -100
            self.items.append({"input_ids": ids, "labels": labels})
        if truncated:
            logger.warning(
                "%d of %d examples of task %r are longer than max_length=%d tokens; their prompt start was cut.",
                truncated,
                len(self.items),
                task.name,
                max_length,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class _RightPadCollator:
    """Pads a batch on the right whatever the tokenizer's `padding_side` (chat tokenizers often pad left): inputs
    with the pad token, labels with -100, and an attention mask of the real tokens."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        from torch.nn.utils.rnn import pad_sequence

        input_ids = [feature["input_ids"] for feature in features]
        return {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),  # (B, L)
            "labels": pad_sequence([f["labels"] for f in features], batch_first=True, padding_value=-100),
            "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True),
        }


def answer_loss(forward, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, object]:
    """(loss, outputs): the cross-entropy of the answer tokens of a right-padded batch, running the LM head only at
    the positions that predict answer tokens.

    On prompt/answer pairs most positions are prompt with label -100, yet the default loss computes the full
    vocabulary's logits at every one of them (SmolLM2: 49k x 576 per position). Passing the union of the batch's
    answer-predicting positions as `logits_to_keep` gives the same summed cross-entropy, scaled by the same
    `num_items_in_batch` as transformers' `ForCausalLMLoss` (None: the mean over the answer tokens), and saves about
    13% of a BIG-bench training step on CPU.

    `forward(**model_inputs)` runs the model: the model itself (`_AnswerLossTrainer`), or a
    `torch.func.functional_call` of it with generated LoRA weights (`peft_cvae.functional_loss`).
    """
    labels = inputs["labels"]  # (B, L)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, L): position t predicts t+1
    keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)  # (K,) positions that predict an answer token
    inputs = {name: value for name, value in inputs.items() if name != "labels"}
    try:
        outputs = forward(**inputs, logits_to_keep=keep)
        logits = outputs.logits  # (B, K, V)
    except TypeError:  # a model without logits_to_keep: every position's logits, then the kept ones
        outputs = forward(**inputs)
        logits = outputs.logits[:, keep]
    targets = shifted[:, keep].to(logits.device)  # (B, K)
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum" if num_items_in_batch is not None else "mean",
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss, outputs


class _AnswerLossTrainer(Trainer):
    """A `Trainer` whose loss is `answer_loss`: the LM head only at the positions that predict answer tokens."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = answer_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def task_dataset(task: TaskData, tokenizer, max_length: int) -> torch.utils.data.Dataset:
    """The training dataset of a task: blocks of its documents, or its examples with answer-only labels."""
    if task.texts is not None:
        return _ChunkDataset([text.strip() for text in task.texts if text.strip()], tokenizer, max_length, task.name)
    return _ExampleDataset(task, tokenizer, max_length)


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    return 0  # masked out by the attention mask and the labels: any id works


# ---- training ------------------------------------------------------------------------------------------------------
class _TaskProgressCallback(ProgressCallback):
    """Trainer's progress bar, labelled with the task and showing the loss, instead of printing a log dict under it at
    every logging step."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=self.label)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)


@contextlib.contextmanager
def quiet_libraries():
    """Silence transformers' and peft's warnings, info logs and weight-loading bars while a task is encoded and
    trained, so each task shows one progress bar (Trainer's, which is plain tqdm) and one summary line."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars_were_disabled = transformers_logging.is_progress_bar_enabled() is False
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            transformers_logging.enable_progress_bar()


def _smoothed_loss(log_history: list[dict]) -> float | None:
    losses = [record["loss"] for record in log_history if "loss" in record]
    if not losses:
        return None
    tail = losses[-max(1, math.ceil(SMOOTHING_SHARE * len(losses))) :]
    return sum(tail) / len(tail)


def train_task_lora(
    base_model, tokenizer, task: TaskData, args: CollectArguments, *, bank=None, condition=None, progress_label=None,
    start=None, resume_dir=None, resume_every: int = 50,
):  # fmt: skip
    """Fine-tune one LoRA on `task` with a `transformers.Trainer`; its kept checkpoints go into `bank`.

    Args:
        base_model: the causal LM (not modified: a copy gets the LoRA).
        tokenizer: its tokenizer.
        task: the task's data.
        args: the fine-tuning arguments.
        bank: the `LoraBank` to add to (None: a new bank with this LoRA's layout).
        condition: the task's condition vector, recorded in the bank with the task's description.
        progress_label: the label of the progress bar (default: the task's name).
        start: a LoRA state dict in PEFT's saved form (`get_peft_model_state_dict`: keys `base_model.model.<module>.
            lora_A.weight`) to start from instead of the shared random initialisation, e.g. a multi-task LoRA. It
            must hold every LoRA tensor of `args.lora_config()`, of the same shapes. Default: `args.start_adapter`'s
            (`start_lora(args)`), or none.
        resume_dir: a folder for a long run to survive a kill: every `resume_every` optimiser steps before the kept
            tail begins, the Trainer's resumable state (LoRA, optimiser, schedule, RNG, data position) is saved there
            (only the newest), and a call with the same folder and arguments continues from it. Checkpoints stop
            where the tail begins, because the tail's kept checkpoints live in memory: a run killed in the tail
            restarts at its start. None: nothing is written (the scratch folder is temporary).

    Returns:
        A `TaskLora`: the bank, the trained `PeftModel`, the kept steps, the training time, the smoothed loss and,
        when the task has `test_texts`, the held-out perplexity before and after training.
    """
    dataset = task_dataset(task, tokenizer, args.max_length)
    torch.manual_seed(args.seed)  # the same LoRA initialisation for every task: the generator models what differs
    with quiet_libraries():
        model = get_peft_model(copy.deepcopy(base_model), args.lora_config())
    start = start if start is not None else start_lora(args)
    if start is not None:
        _load_start(model, start, task.name)
    before = _held_out_perplexity(model, tokenizer, task, args)  # B = 0: the base model's perplexity
    callback = LoraCheckpointCallback(
        bank, task.name, description=task.description, condition=condition, save_steps=args.checkpoint_every,
        last_fraction=args.last_fraction,
    )  # fmt: skip
    started = time.perf_counter()
    scratch_folder = tempfile.TemporaryDirectory(prefix="peft-cvae-collect-") if resume_dir is None else None
    with contextlib.ExitStack() as stack, quiet_libraries():
        scratch = stack.enter_context(scratch_folder) if scratch_folder is not None else str(resume_dir)
        training_args = TrainingArguments(
            output_dir=scratch,
            save_total_limit=1,  # resume_dir: only the newest resumable checkpoint
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",  # decay to 0: the kept checkpoints sit on a converged tail (DESIGN §7)
            warmup_steps=min(10, args.steps // 10),
            weight_decay=0.0,
            bf16=args.bf16,
            use_cpu=not torch.cuda.is_available(),  # bf16 autocast then runs on the CPU instead of being refused
            logging_steps=1,  # every step's loss, for the smoothed loss of the summary (not printed)
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=False,
        )
        trainer_class = Trainer if task.texts is not None else _AnswerLossTrainer  # documents: every token is a label
        trainer = trainer_class(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=_RightPadCollator(_pad_token_id(tokenizer)),
            callbacks=[callback],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_TaskProgressCallback(progress_label or task.name))
        resume_from = None
        if resume_dir is not None:
            from transformers.trainer_utils import get_last_checkpoint

            trainer.add_callback(_ResumableCheckpoints(resume_every, callback.first_kept_step(args.steps)))
            resume_from = get_last_checkpoint(str(resume_dir)) if Path(resume_dir).is_dir() else None
        trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    after = _held_out_perplexity(model, tokenizer, task, args)
    if args.save_adapters:
        from .file_utils import atomic_directory

        with atomic_directory(Path(args.save_adapters) / check_task_name(task.name)) as staging:
            model.save_pretrained(staging)
    return TaskLora(
        bank=callback.bank,
        model=model,
        steps=list(callback.saved_steps),
        train_seconds=seconds,
        loss=_smoothed_loss(trainer.state.log_history),
        num_sequences=len(dataset),
        held_out_perplexity=None if before is None else (before, after),
        resumed_from=None if resume_from is None else int(Path(resume_from).name.split("-")[-1]),
    )


def start_lora(args: CollectArguments) -> dict[str, torch.Tensor] | None:
    """The state dict of `args.start_adapter` (None without one), refused unless its LoRA config computes what this
    run's does (`layout.lora_config_differences`, the check a bank applies to its adapters): another alpha would
    silently rescale the start, another rank or module list would not load."""
    if args.start_adapter is None:
        return None
    from .adapter_io import load_adapter
    from .layout import lora_config_differences

    config, state_dict = load_adapter(args.start_adapter)
    different = lora_config_differences(args.lora_config(), config)
    if different:
        listed = ", ".join(f"{key}={start!r} (this run: {run!r})" for key, (run, start) in different.items())
        raise InvalidConfigError(
            f"The start adapter {args.start_adapter} has {listed}. Collect with the start's --lora-r, --lora-alpha "
            "and --target-modules, or train the start with this run's."
        )
    return state_dict


class _ResumableCheckpoints(TrainerCallback):
    """Asks the Trainer to save its resumable state every `every` steps before step `first_kept` (see
    `train_task_lora`'s `resume_dir`)."""

    def __init__(self, every: int, first_kept: int):
        self.every = every
        self.first_kept = first_kept

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < self.first_kept:
            control.should_save = True
        return control


def _load_start(model, start: dict, task_name: str) -> None:
    """Loads the start LoRA into the fresh PeftModel; refuses one that does not cover its LoRA tensors exactly (a
    partial start would train some modules from the shared initialisation and others from the start, silently)."""
    from peft.utils import set_peft_model_state_dict

    expected = {name: parameter.shape for name, parameter in model.named_parameters() if "lora_" in name}
    try:
        result = set_peft_model_state_dict(model, start)
    except RuntimeError as error:  # a shape mismatch
        raise InvalidConfigError(
            f"The start LoRA of task {task_name!r} does not fit this LoRA config ({error}). Train the start with the "
            "same --lora-r and --target-modules."
        ) from None
    missing = sorted(name for name in result.missing_keys if name in expected)
    if missing or result.unexpected_keys:
        raise InvalidConfigError(
            f"The start LoRA of task {task_name!r} does not match this LoRA config: missing {missing[:3]} "
            f"({len(missing)}), unexpected {list(result.unexpected_keys)[:3]} ({len(result.unexpected_keys)}). Train "
            "the start with the same --lora-r and --target-modules."
        )


def _held_out_perplexity(model, tokenizer, task: TaskData, args: CollectArguments) -> float | None:
    """Perplexity on the task's held-out texts (None without any), in windows of `max_length` tokens."""
    if not task.test_texts:
        return None
    from .evaluation import evaluate_language_model

    with quiet_libraries():
        return evaluate_language_model(
            model, tokenizer, task.test_texts, max_length=max(2, args.max_length), batch_size=args.batch_size,
            autocast_dtype=torch.bfloat16 if args.bf16 else None, progress=False,
        )["perplexity"]  # fmt: skip


def default_task_encoder(base_model, tokenizer, args: CollectArguments):
    """The task encoder `args.condition` asks for: a sentence encoder of descriptions, or the base model's hidden
    states of a few texts (ICM-LoRA Eq. 1)."""
    from .task_encoding import HiddenStateTaskEncoder, TextTaskEncoder

    if args.condition == "in-context":
        return HiddenStateTaskEncoder(base_model, tokenizer, max_length=args.max_length)
    return TextTaskEncoder(args.text_encoder)


def check_tasks(tasks: list[TaskData], args: CollectArguments) -> None:
    """Refuse tasks that cannot be collected, before any training: repeated names, missing descriptions."""
    if not tasks or not all(isinstance(task, TaskData) for task in tasks):
        raise InvalidConfigError("tasks must be a non-empty list of TaskData.")
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidConfigError(f"Tasks {repeated} appear more than once; task names must be unique.")
    if args.condition == "text":
        missing = [task.name for task in tasks if not task.description.strip()]
        if missing:
            raise InvalidConfigError(
                f"Tasks {missing} have no 'description', which --condition text embeds as the task vector. Add "
                "descriptions to the spec, or use --condition in-context."
            )


def collect_bank(
    base_model, tokenizer, tasks: list[TaskData], args: CollectArguments | None = None, *, task_encoder=None,
    bank=None, on_task_end=None,
):  # fmt: skip
    """Fine-tune one LoRA per task and return the `LoraBank` of their kept checkpoints, with a condition per task.

    Args:
        base_model: the causal LM every LoRA is trained on.
        tokenizer: its tokenizer.
        tasks: the tasks (`read_task_spec` reads them from a spec file).
        args: fine-tuning arguments (default: `CollectArguments()`).
        task_encoder: turns a task into its condition vector; default `default_task_encoder(...)` (from
            `args.condition` and `args.text_encoder`). Text encoders get the description, others the task's first
            `args.num_examples` texts.
        bank: a bank to add to (its layout must match); None starts a new one.
        on_task_end: called with `(task, TaskLora)` after each task (the CLI prints its summary line there).

    Returns:
        The bank, with `bank.condition_encoder` set to `task_encoder.to_dict()`.
    """
    args = args if args is not None else CollectArguments()
    check_tasks(tasks, args)
    start = start_lora(args)  # read and checked before any training
    if task_encoder is None:
        task_encoder = default_task_encoder(base_model, tokenizer, args)
    for index, task in enumerate(tasks):
        with quiet_libraries():
            condition = task_encoder.encode(
                task.description
                if getattr(task_encoder, "kind", None) == "text"
                else task.sample_texts(args.num_examples)
            )
        label = f"[{index + 1}/{len(tasks)}] {task.name}"
        result = train_task_lora(
            base_model, tokenizer, task, args, bank=bank, condition=condition, progress_label=label, start=start
        )
        bank = result.bank
        if on_task_end is not None:
            on_task_end(task, result)
    bank.condition_encoder = task_encoder.to_dict()
    return bank
