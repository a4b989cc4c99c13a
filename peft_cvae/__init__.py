"""peft-cvae: learn to generate PEFT LoRA adapters with a conditional VAE (after ICM-LoRA, 2025).

Train one `PeftCVAEGenerator` on a `LoraBank` of LoRA checkpoints of one base model, then write a task's LoRA in one
forward pass with `generator.generate_adapter(task)`.
"""

from transformers import AutoConfig, AutoModel

from .adapter import GeneratedAdapter
from .answer_evaluation import evaluate_answers
from .callbacks import LoraCheckpointCallback
from .collect import CollectArguments, TaskData, TaskExample, collect_bank, read_task_spec, train_task_lora
from .configuration_peft_cvae import PeftCVAEConfig
from .data import LoraBank, LoraCheckpoint
from .errors import (
    ConditionError,
    CorruptFileError,
    EmptyBankError,
    InvalidArgumentError,
    InvalidConfigError,
    LayoutMismatchError,
    MissingExtraError,
    MissingFileError,
    NonFiniteError,
    NotWritableError,
    PeftCVAEError,
    UnknownTaskError,
    UnsupportedAdapterError,
)
from .layout import LoraLayout
from .merging import MergedAdapter, merge_adapters
from .modeling_peft_cvae import PeftCVAEGenerator, PeftCVAEOutput
from .task_encoding import HiddenStateTaskEncoder, TaskEncoder, TextTaskEncoder, load_task_encoder
from .training import train_generator
from .training_args import GeneratorTrainingArguments

__version__ = "0.1.0"

AutoConfig.register(PeftCVAEConfig.model_type, PeftCVAEConfig, exist_ok=True)
AutoModel.register(PeftCVAEConfig, PeftCVAEGenerator, exist_ok=True)

__all__ = [
    "CollectArguments",
    "ConditionError",
    "CorruptFileError",
    "EmptyBankError",
    "GeneratedAdapter",
    "GeneratorTrainingArguments",
    "HiddenStateTaskEncoder",
    "InvalidArgumentError",
    "InvalidConfigError",
    "LayoutMismatchError",
    "LoraBank",
    "LoraCheckpoint",
    "LoraCheckpointCallback",
    "LoraLayout",
    "MergedAdapter",
    "MissingExtraError",
    "MissingFileError",
    "NonFiniteError",
    "NotWritableError",
    "PeftCVAEConfig",
    "PeftCVAEError",
    "PeftCVAEGenerator",
    "PeftCVAEOutput",
    "TaskData",
    "TaskEncoder",
    "TaskExample",
    "TextTaskEncoder",
    "UnknownTaskError",
    "UnsupportedAdapterError",
    "collect_bank",
    "evaluate_answers",
    "load_task_encoder",
    "merge_adapters",
    "read_task_spec",
    "train_generator",
    "train_task_lora",
]
