"""Tiny models and really-trained LoRA banks for the tests, built from configs in milliseconds (no downloads)."""

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from peft_cvae.testing_utils import tiny_bert, tiny_llama

VOCAB_SIZE = 64
TASKS = ("ascending", "descending", "repeating")


def tiny_lora_config(**overrides) -> LoraConfig:
    fields = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**fields, **overrides})


def task_batch(task: str, generator: torch.Generator, batch_size: int = 8, length: int = 16) -> torch.Tensor:
    """Token sequences of one synthetic task; each task is a different deterministic pattern over the vocabulary."""
    start = torch.randint(0, VOCAB_SIZE, (batch_size, 1), generator=generator)
    position = torch.arange(length)
    if task == "ascending":
        return (start + position) % VOCAB_SIZE
    if task == "descending":
        return (start - 3 * position) % VOCAB_SIZE
    if task == "repeating":
        return (start + 7 * (position % 2)) % VOCAB_SIZE
    raise ValueError(task)


def train_lora_checkpoints(task: str, *, steps: int = 40, keep_from: int = 25, every: int = 5, seed: int = 0):
    """Fine-tune a LoRA on one task and return the PEFT state dicts of the last part of training (step, state)."""
    model = get_peft_model(tiny_llama(), tiny_lora_config())  # same LoRA init for every task, as with a fixed seed
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    data = torch.Generator().manual_seed(seed)
    checkpoints = []
    model.train()
    for step in range(1, steps + 1):
        tokens = task_batch(task, data)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= keep_from and step % every == 0:
            state = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
            checkpoints.append((step, state))
    return checkpoints, model.peft_config["default"]


def task_conditions(size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """One fixed random task vector per synthetic task."""
    generator = torch.Generator().manual_seed(seed)
    return {task: torch.randn(size, generator=generator) for task in TASKS}


def build_bank():
    """A LoraBank of the three synthetic tasks, 4 real checkpoints each."""
    from peft_cvae import LoraBank, LoraLayout

    bank = None
    conditions = task_conditions()
    for task in TASKS:
        checkpoints, config = train_lora_checkpoints(task)
        if bank is None:
            bank = LoraBank(LoraLayout.from_state_dict(checkpoints[0][1], config))
        for step, state in checkpoints:
            bank.add_checkpoint(task, state, step=step)
        bank.set_condition(task, conditions[task], description=f"token sequences that follow the {task} pattern")
    return bank


def small_generator_overrides() -> dict:
    """Network sizes that train in seconds on the tiny layout."""
    return {"patch_size": 16, "hidden_channels": 32, "latent_size": 8, "num_layers": 2}


TINY_WORDS = (
    "football match report sport news python source code the a of tokens sequences follow ascending descending "
    "repeating pattern up down again numbers count"
).split()


def save_tiny_text_encoder(folder, kind: str = "bert", seed: int = 0) -> str:
    """Save a tiny random text encoder with a WordPiece tokenizer (built from `TINY_WORDS`) to `folder`.

    kind: "bert" (BertModel, hidden 16), "clip_text" (CLIPTextModel, pooled output) or "clip" (a full CLIPModel whose
    text embeddings are projected to 12 dimensions). Returns the folder as a string, for `TextTaskEncoder(folder)`.
    """
    from pathlib import Path

    from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**sizes, "vocab_size": len(vocab), "max_position_embeddings": 64}
    clip_text = {**text, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}  # CLIP pools at the [SEP] token
    if kind == "bert":
        model = tiny_bert(len(vocab), seed)
    elif kind == "clip_text":
        model = CLIPTextModel(CLIPTextConfig(**clip_text))
    elif kind == "clip":
        vision = {**sizes, "image_size": 32, "patch_size": 16}
        model = CLIPModel(CLIPConfig(text_config=clip_text, vision_config=vision, projection_dim=12))
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return str(folder)
