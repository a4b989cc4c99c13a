"""Task encoders: turn a task (a description, or a few example texts) into the condition vector c of the generator.

Two kinds, as in ICM-LoRA:

- `TextTaskEncoder` embeds a task *description* with a sentence encoder (any transformers encoder; default
  all-MiniLM-L6-v2, 384-d): the last hidden state mean-pooled over the attention mask, then L2-normalised. CLIP text
  encoders use their pooled (and, if present, projected) output instead.
- `HiddenStateTaskEncoder` is the paper's Eq. 1, the in-context path: run a few *example texts* of the task through the
  base causal LM, take the last layer's hidden state at each example's last real token, and average over examples.

Every encoder describes itself with `to_dict()` (`{"kind": ..., "name_or_path": ..., ...}`, plain JSON). A
`LoraBank` and a `PeftCVAEConfig` record that dict, so a generator loaded with `from_pretrained` can rebuild the very
encoder its training conditions came from with `load_task_encoder(spec)`. Loading is lazy (the model is read on the
first `encode`) and cached per spec, so repeated `generate_adapter("a description")` calls load the encoder once.
"""

import functools
import json
import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from .errors import ConditionError

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "DEFAULT_TEXT_ENCODER_PATH_ENV",
    "HiddenStateTaskEncoder",
    "TaskEncoder",
    "TextTaskEncoder",
    "load_task_encoder",
    "resolve_text_encoder_path",
]

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
"""The Hub id of the default text encoder; always the name recorded for it, wherever its weights are read from."""
DEFAULT_TEXT_ENCODER_PATH_ENV = "PEFT_CVAE_DEFAULT_TEXT_ENCODER_PATH"
"""Environment variable: a local folder to read the default text encoder from (see `resolve_text_encoder_path`)."""


@runtime_checkable
class TaskEncoder(Protocol):
    """What a task encoder offers: a fixed-size float32 CPU vector per task, and a JSON description of itself."""

    kind: str

    @property
    def condition_size(self) -> int:
        """Length of the vectors `encode` returns."""

    def encode(self, task) -> torch.Tensor:
        """A task (a description, or a list of example texts) -> condition vector, shape (condition_size,)."""

    def to_dict(self) -> dict:
        """`{"kind": ..., "name_or_path": ..., ...}`: enough for `load_task_encoder` to rebuild this encoder."""


def _texts(task, what: str) -> list[str]:
    """A string or a non-empty list of strings -> list of strings, or a clear error."""
    texts = [task] if isinstance(task, str) else task
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(text, str) for text in texts):
        raise ConditionError(
            f"{what} takes a string or a non-empty list of strings, got {type(task).__name__}: {task!r:.80}."
        )
    return list(texts)


def resolve_text_encoder_path(name_or_path: str, local_path: str | os.PathLike | None = None) -> str:
    """Where a text encoder recorded as `name_or_path` is read from: `local_path` when given; else, when
    `name_or_path` is `DEFAULT_TEXT_ENCODER` and `PEFT_CVAE_DEFAULT_TEXT_ENCODER_PATH` is set, that folder; else
    `name_or_path` itself (a folder, or a Hub id that transformers downloads or finds in its cache).

    Raises:
        ConditionError: the local folder chosen (by argument or by the environment variable) holds no config.json.
    """
    source = "local_path"
    if local_path is None and name_or_path == DEFAULT_TEXT_ENCODER:
        local_path, source = os.environ.get(DEFAULT_TEXT_ENCODER_PATH_ENV) or None, DEFAULT_TEXT_ENCODER_PATH_ENV
    if local_path is None:
        return name_or_path
    if not (Path(local_path) / "config.json").is_file():
        raise ConditionError(
            f"The text encoder {name_or_path!r} is to be read from {str(local_path)!r} ({source}), but that folder "
            f"holds no config.json. Point {source} at a transformers model folder, or unset it to use "
            f"{name_or_path!r} itself."
        )
    logger.info("Reading the text encoder %s from the local folder %s (%s).", name_or_path, local_path, source)
    return str(local_path)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


class TextTaskEncoder:
    """Sentence embedding of a task description: mean-pooled over the attention mask and L2-normalised.

    Works with any transformers encoder (`AutoModel`), e.g. BERT-like sentence encoders. For CLIP checkpoints
    (`CLIPConfig` or `CLIPTextConfig`) the pooled output is used: the projected `text_embeds` when the checkpoint has
    a text projection (a full CLIP model, or `CLIPTextModelWithProjection`), otherwise `pooler_output`.

    Args:
        model_name_or_path: folder or Hub id of the encoder, recorded in `to_dict()`. Default: all-MiniLM-L6-v2,
            `"sentence-transformers/all-MiniLM-L6-v2"`.
        pooling: `"mean"` (over real tokens) or `"cls"` (the first token); ignored for CLIP, which has its own pooling.
        max_length: texts are truncated to this many tokens, or to the encoder's own limit when that is smaller (its
            `max_position_embeddings`, and its tokenizer's `model_max_length` when set: 77 for CLIP text encoders);
            a truncated text is reported once per encoder with a warning. `to_dict()` records `max_length` as given,
            so a saved generator rebuilds an encoder that cuts texts at the same place.
        local_path: a folder to read the weights from instead of `model_name_or_path` (no network needed); not
            recorded, so what this encoder makes still names `model_name_or_path`. Without it, the default encoder
            is read from `PEFT_CVAE_DEFAULT_TEXT_ENCODER_PATH` when set (see `resolve_text_encoder_path`).

    Example:
        ```python
        encoder = TextTaskEncoder()
        condition = encoder.encode("football match reports")  # (384,), unit norm
        ```
    """

    kind = "text"
    POOLINGS = ("mean", "cls")

    def __init__(
        self,
        model_name_or_path: str | None = None,
        pooling: str = "mean",
        max_length: int = 256,
        *,
        local_path: str | os.PathLike | None = None,
    ):
        if pooling not in self.POOLINGS:
            raise ConditionError(f"pooling must be one of {self.POOLINGS}, got {pooling!r}.")
        self.name_or_path = str(model_name_or_path) if model_name_or_path is not None else DEFAULT_TEXT_ENCODER
        self.local_path = local_path
        self.pooling = pooling
        self.max_length = max_length
        self._model = None
        self._tokenizer = None
        self._output = None  # which output holds the embedding: "text_embeds", "pooler_output" or "last_hidden_state"
        self._token_limit = None  # min(max_length, the encoder's position limit), set by _load
        self._warned_truncation = False

    def __repr__(self) -> str:
        return f"TextTaskEncoder({self.name_or_path!r}, pooling={self.pooling!r})"

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        path = resolve_text_encoder_path(self.name_or_path, self.local_path)
        config = AutoConfig.from_pretrained(path)
        if isinstance(config, CLIPConfig):
            # A full CLIP checkpoint holds text_model.* and text_projection.*: load those, skip the vision tower.
            text_config = config.text_config
            text_config.projection_dim = config.projection_dim
            verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()  # the skipped vision weights are expected, not news
            try:
                model = CLIPTextModelWithProjection.from_pretrained(path, config=text_config)
            finally:
                transformers_logging.set_verbosity(verbosity)
            self._output = "text_embeds"
        elif isinstance(config, CLIPTextConfig) and "CLIPTextModelWithProjection" in (config.architectures or []):
            model, self._output = CLIPTextModelWithProjection.from_pretrained(path), "text_embeds"
        elif isinstance(config, CLIPTextConfig):
            model, self._output = CLIPTextModel.from_pretrained(path), "pooler_output"
        else:
            model, self._output = AutoModel.from_pretrained(path), "last_hidden_state"
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = model.eval()
        self._token_limit = self._limit()

    def _limit(self) -> int:
        """Tokens a text may have: `max_length`, the model's position embeddings (CLIP: its text config's) and the
        tokenizer's `model_max_length` when it is a real number (transformers uses a huge integer for "unset")."""
        limits = [self.max_length]
        positions = getattr(self._model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        model_max_length = getattr(self._tokenizer, "model_max_length", None)
        if isinstance(model_max_length, int) and 0 < model_max_length < 1_000_000:
            limits.append(model_max_length)
        return min(limits)

    def _warn_if_truncated(self, texts: list[str], lengths: list[int]) -> None:
        """Warn once per encoder when a text had more tokens than the limit (only texts that reached it are
        tokenized again, untruncated, to know)."""
        if self._warned_truncation:
            return
        for text, length in zip(texts, lengths):
            if length < self._token_limit:
                continue
            verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()  # "longer than the maximum" is what we are about to say
            try:
                full = len(self._tokenizer(text, truncation=False)["input_ids"])
            finally:
                transformers_logging.set_verbosity(verbosity)
            if full > self._token_limit:
                self._warned_truncation = True
                limit = self._token_limit
                logger.warning(
                    f"A task description has {full} tokens; the text encoder {self.name_or_path} reads at most "
                    f"{limit}, so it is truncated to its first {limit} tokens. Keep what matters in the first "
                    f"{limit} tokens. (Said once per encoder.)"
                )
                return

    @property
    def condition_size(self) -> int:
        self._load()
        config = self._model.config
        return config.projection_dim if self._output == "text_embeds" else config.hidden_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """One unit-norm embedding per text, shape (B, condition_size), float32 on the CPU."""
        texts = _texts(texts, "TextTaskEncoder.embed")
        self._load()
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self._token_limit, return_tensors="pt"
        )
        self._warn_if_truncated(texts, batch["attention_mask"].sum(dim=-1).tolist())
        batch = {key: value.to(_model_device(self._model)) for key, value in batch.items()}
        output = self._model(**batch)
        if self._output != "last_hidden_state":
            pooled = getattr(output, self._output)  # (B, D)
        elif self.pooling == "cls":
            pooled = output.last_hidden_state[:, 0]  # (B, D)
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)  # (B, T, 1)
            pooled = (output.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B, D)
        return F.normalize(pooled.float(), dim=-1).cpu()

    def encode(self, task) -> torch.Tensor:
        """A description -> its embedding (condition_size,). Several descriptions (a list) are embedded, averaged
        and normalised again, e.g. to smooth over paraphrases."""
        embeddings = self.embed(_texts(task, "TextTaskEncoder.encode"))  # (B, D)
        return embeddings[0] if len(embeddings) == 1 else F.normalize(embeddings.mean(dim=0), dim=0)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "pooling": self.pooling,
            "max_length": self.max_length,
        }


class HiddenStateTaskEncoder:
    """In-context task vector, ICM-LoRA Eq. 1: the base model's last hidden state at the last real token of each
    example text, averaged over the examples.

    Padding never changes the result: the last real token is found from the attention mask (left or right padding),
    and position ids are counted over real tokens only, so a left-padded example sees the same positions as alone.

    Args:
        base_model: the causal LM the LoRAs are trained on (a `PreTrainedModel`; a `PeftModel` works too, but its
            active adapter then changes the vectors).
        tokenizer: its tokenizer. Its `padding_side` is respected; a missing pad token is fine.
        max_length: examples are truncated to this many tokens.
        batch_size: examples run through the model this many at a time.
        name_or_path: recorded in `to_dict()` so the encoder can be rebuilt; defaults to the model's `name_or_path`.
    """

    kind = "hidden_state"

    def __init__(
        self, base_model, tokenizer, max_length: int = 256, batch_size: int = 8, name_or_path: str | None = None
    ):
        self.model = base_model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.name_or_path = name_or_path or getattr(base_model, "name_or_path", None) or None

    def __repr__(self) -> str:
        return f"HiddenStateTaskEncoder({self.name_or_path!r}, max_length={self.max_length})"

    @property
    def condition_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    def _pad(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad token id lists on the tokenizer's padding side -> input_ids, attention_mask, each (B, T)."""
        length = max(len(tokens) for tokens in token_lists)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0  # masked out anyway
        input_ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_lists), length), dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            span = slice(length - len(tokens), length) if self.tokenizer.padding_side == "left" else slice(len(tokens))
            input_ids[row, span] = torch.tensor(tokens)
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    @torch.no_grad()
    def last_token_states(self, examples: list[str]) -> torch.Tensor:
        """Last-layer hidden state at each example's last real token, shape (B, hidden_size), float32 on the CPU."""
        examples = _texts(examples, "HiddenStateTaskEncoder")
        token_lists = self.tokenizer(examples, truncation=True, max_length=self.max_length)["input_ids"]
        if any(len(tokens) == 0 for tokens in token_lists):
            raise ConditionError("An example text has no tokens; pass non-empty example texts.")
        device = _model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        states = []
        try:
            for start in range(0, len(token_lists), self.batch_size):
                input_ids, attention_mask = self._pad(token_lists[start : start + self.batch_size])  # (b, T) each
                position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # counted over real tokens only
                last_layer = self._last_hidden_state(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device),
                )  # (b, T, H)
                positions = torch.arange(attention_mask.shape[1])
                last_real = (attention_mask * positions).argmax(dim=-1).to(device)  # (b,) works for either padding
                states.append(last_layer[torch.arange(len(last_real), device=device), last_real].float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(states)  # (B, H)

    def _last_hidden_state(self, **inputs) -> torch.Tensor:
        # The backbone without its LM head (e.g. LlamaModel inside LlamaForCausalLM) returns the same last hidden
        # state as `output_hidden_states=True` on the full model, without computing (b, T, vocab) logits.
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # PeftModel
        backbone = getattr(model, "base_model", model)
        if backbone is not model:
            output = backbone(**inputs)
            if getattr(output, "last_hidden_state", None) is not None:
                return output.last_hidden_state
        return self.model(**inputs, output_hidden_states=True).hidden_states[-1]

    def encode(self, task) -> torch.Tensor:
        """Example texts of a task (a list; one string counts as one example) -> their mean last-token state (H,)."""
        return self.last_token_states(_texts(task, "HiddenStateTaskEncoder.encode")).mean(dim=0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "max_length": self.max_length}


def _check_spec(spec) -> dict:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ConditionError(
            f"A task encoder spec is a dict with a 'kind' field, e.g. {{'kind': 'text', 'name_or_path': "
            f"{DEFAULT_TEXT_ENCODER!r}}}, got {spec!r}."
        )
    if spec["kind"] not in ("text", "hidden_state"):
        raise ConditionError(
            f"Unknown task encoder kind {spec['kind']!r}; this peft-cvae knows 'text' and 'hidden_state'. Upgrade "
            "peft-cvae, or pass your own encoder with task_encoder=."
        )
    return spec


@functools.lru_cache(maxsize=4)
def _load_cached(spec_json: str):
    spec = json.loads(spec_json)
    if spec["kind"] == "text":
        options = {key: spec[key] for key in ("pooling", "max_length") if key in spec}
        return TextTaskEncoder(spec.get("name_or_path"), **options)
    if not spec.get("name_or_path"):
        raise ConditionError(
            "This generator's conditions come from the hidden states of an in-memory base model whose name or path "
            "was not recorded, so the encoder cannot be rebuilt. Pass task_encoder=HiddenStateTaskEncoder(model, "
            "tokenizer) (or base_model= and tokenizer= to load_task_encoder)."
        )
    model = AutoModelForCausalLM.from_pretrained(spec["name_or_path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["name_or_path"])
    return HiddenStateTaskEncoder(model, tokenizer, max_length=spec.get("max_length", 256))


def load_task_encoder(spec: dict, base_model=None, tokenizer=None) -> TaskEncoder:
    """Rebuild the encoder a spec (`encoder.to_dict()`, as stored in a generator's config) describes.

    Text encoders are cached per spec and load their model lazily, on the first `encode`. A hidden-state encoder
    runs `base_model` (with `tokenizer`, or the tokenizer saved with the spec's `name_or_path`) when one is given, and
    otherwise loads the recorded model with `AutoModelForCausalLM` (cached).

    Raises:
        ConditionError: the spec is malformed or of an unknown kind, or a hidden-state model cannot be found.
    """
    spec = _check_spec(spec)
    if spec["kind"] == "hidden_state" and base_model is not None:
        if tokenizer is None:
            source = spec.get("name_or_path") or getattr(base_model, "name_or_path", None)
            if not source:
                raise ConditionError("Pass tokenizer= with base_model=: the model records no path to load one from.")
            tokenizer = AutoTokenizer.from_pretrained(source)
        return HiddenStateTaskEncoder(
            base_model, tokenizer, max_length=spec.get("max_length", 256), name_or_path=spec.get("name_or_path")
        )
    return _load_cached(json.dumps(spec, sort_keys=True))
