"""Language-model quality on held-out text: perplexity and bits per character, computed in torch.

The metric scripts of `evaluate` live on the Hugging Face Hub (unreachable offline), and the Hub's `perplexity` metric
takes a model id rather than a model in memory. `evaluate_language_model` works on any causal language model that is
already loaded: a transformers model, a `peft.PeftModel` with a LoRA attached (a generated one, a merge, a soup), on
any device, optionally under autocast.

How texts are scored:

- Each text is tokenized on its own (no special tokens), and the tokenizer's BOS token (or, if it has none, its EOS
  token, the usual document separator) is put in front as context, so that the first token of the text is predicted
  too. Texts never see each other.
- A text longer than `max_length` tokens is cut into windows of `max_length` tokens; each window starts `stride`
  tokens after the previous one, and only the tokens that no earlier window predicted are scored, the rest serve as
  context. Every token of every text is therefore predicted exactly once, with at least `max_length - stride` tokens of
  context from the second window on (the default `stride = max_length - 1` is the fastest; a smaller stride gives
  more context and a lower perplexity, at the cost of more forward passes).
- A tokenizer that starts every sequence with special tokens (Gemma's `<bos>`, Llama 3's `<|begin_of_text|>`) gets
  them in front of every later window too, unscored: such a model is trained and run with them at the start of every
  sequence (Gemma-3 without its `<bos>` is a different model, see `collect.sequence_prefix`). Those windows hold
  `max_length - len(start tokens)` text tokens. Tokenizers without start tokens (SmolLM2, GPT-2) are unaffected.
- Perplexity is `exp(total negative log-likelihood / number of predicted tokens)`. It depends on the tokenizer.
- Bits per character is `total negative log-likelihood in nats / ln 2 / number of characters`, where the characters are
  all the Unicode code points of the texts, `sum(len(text) for text in texts)`: exactly the text whose tokens were
  predicted. It does not depend on the tokenizer, so it compares models with different vocabularies (for lossless
  tokenizers; one that drops or replaces characters gets them for free). If the tokenizer has neither a BOS nor an
  EOS token, the first token of each text has no context and is not predicted; its characters are then left out.
"""

import hashlib
import json
import logging
import math
import os
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .file_utils import read_json, sha256_file, write_json

__all__ = [
    "compare_to_first",
    "evaluate_adapters",
    "evaluate_language_model",
    "language_model_metric",
    "load_adapter_checked",
]


def _check_arguments(texts, max_length, batch_size, stride) -> int:
    """Validate the arguments of `evaluate_language_model`; return the stride to use."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single string. Wrap it in a list: [text].")
    if not all(isinstance(text, str) for text in texts):
        wrong = next(type(text).__name__ for text in texts if not isinstance(text, str))
        raise TypeError(f"texts must be a list of strings, but it holds a {wrong}. Pass the raw texts, not token ids.")
    if len(texts) == 0:
        raise ValueError("texts is empty: pass at least one non-empty text to score.")
    for name, value, minimum in (("max_length", max_length, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if stride is None:
        return max_length - 1
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length - 1:
        raise ValueError(
            f"stride must be an integer from 1 to max_length - 1 = {max_length - 1}, got {stride!r}: consecutive "
            "windows must overlap by at least one token for every token to be predicted. Leave it as None for "
            "windows that overlap by exactly one token."
        )
    return stride


def _context_token_id(tokenizer) -> int | None:
    """The token put in front of every text: BOS, else EOS, else none."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return None


def _tokenize(tokenizer, text: str, context_token_id: int | None) -> tuple[list[int], int]:
    """Token ids of `text` (with the context token in front) and the number of characters they predict."""
    if context_token_id is not None:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return ([context_token_id, *ids], len(text)) if ids else ([], 0)
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        first_token_end = offsets[0][1] if ids else len(text)
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        first_token_end = len(tokenizer.decode(ids[:1])) if ids else len(text)
    # Without a context token, the first token cannot be predicted: its characters are not scored.
    return ids, len(text) - first_token_end


def _windows(ids: list[int], max_length: int, stride: int, lead: list[int] = ()):
    """Yield (input ids, labels) windows; each token after the first is labelled (predicted) in exactly one window.

    `lead`: the tokenizer's start tokens (`collect.sequence_prefix`: Gemma's `<bos>`), put in front of every window
    after the first as unscored context, because such a model was trained (and is run) with them at the start of
    every sequence; those windows then hold `max_length - len(lead)` text tokens and start at most `max_length -
    len(lead) - 1` tokens apart, so that they still overlap."""
    lead = list(lead)
    first_unscored = 1
    start = 0
    while first_unscored < len(ids):
        front = lead if start > 0 else []  # the first window starts with the text's own context token
        end = min(start + max_length - len(front), len(ids))
        labels = [-100] * (len(front) + first_unscored - start) + ids[first_unscored:end]
        yield front + ids[start:end], labels
        first_unscored = end
        start += min(stride, max_length - len(front) - 1) if front else stride


def _window_lead(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """The tokenizer's start tokens (none for SmolLM2 or GPT-2: windows are then exactly as before), checked to leave
    room for two text tokens per window."""
    from .collect import sequence_prefix

    sample = next((text for text in texts if text.strip()), "a")
    lead = sequence_prefix(tokenizer, sample)
    if lead and max_length < len(lead) + 2:
        raise ValueError(
            f"max_length={max_length} leaves no room for text: this tokenizer starts every sequence with {len(lead)} "
            f"special token(s), which every window repeats. Use max_length >= {len(lead) + 2}."
        )
    return lead


def _batches(windows: list, batch_size: int, pad_token_id: int, device: torch.device):
    """Right-padded batches: padding is masked out of attention and labelled -100, so it is never scored."""
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, window_labels) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(window_labels)
            attention_mask[row, : len(ids)] = 1
        yield input_ids.to(device), attention_mask.to(device), labels.to(device)


logger = logging.getLogger(__name__)

SCORE_CACHE_VERSION = 1  # bump when how a text is scored changes: older cached scores are then not used


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def evaluate_language_model(
    model,
    tokenizer,
    texts,
    *,
    max_length: int = 256,
    batch_size: int = 8,
    stride: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress_label: str = "Scoring text",
    progress: bool = True,
) -> dict:
    """Score a causal language model on texts: perplexity and bits per character (see the module docstring).

    Args:
        model: any causal LM that takes `input_ids` and `attention_mask` and returns `logits` (a transformers
            `...ForCausalLM`, a `peft.PeftModel`). It is put in eval mode for the call and its mode is restored after.
        tokenizer: the model's tokenizer.
        texts: a list of strings; each is scored on its own. Empty strings contribute nothing.
        max_length: tokens per window (the context token included).
        batch_size: windows per forward pass. It does not change the result (padding is masked), only speed and
            memory.
        stride: how many tokens each window starts after the previous one, from 1 to `max_length - 1`; `None` means
            `max_length - 1` (windows overlap by one token).
        autocast_dtype: run the forward passes under `torch.autocast` with this dtype (e.g. `torch.bfloat16` on CPU).
            The log-likelihoods are always computed in float32.
        progress_label: the label of the progress bar (shown on a terminal).
        progress: False hides the progress bar (`collect` scores held-out texts inside a task's own bar).

    Returns:
        A dict with `perplexity` (per token), `bits_per_character`, `loss` (mean negative log-likelihood per predicted
        token, in nats), `num_tokens` (tokens predicted) and `num_characters` (characters scored).

    Example:
        ```python
        model, tokenizer = load_smollm2()
        evaluate_language_model(model, tokenizer, load_domain_texts("sport", "test", max_texts=20), max_length=128)
        ```
    """
    stride = _check_arguments(texts, max_length, batch_size, stride)
    context_token_id = _context_token_id(tokenizer)
    lead = _window_lead(tokenizer, texts, max_length)
    windows = []
    num_characters = 0
    for text in texts:
        ids, characters = _tokenize(tokenizer, text, context_token_id)
        windows.extend(_windows(ids, max_length, stride, lead))
        num_characters += characters
    if not windows:
        raise ValueError("No token to score: every text is empty (or a single token). Pass non-empty texts.")
    pad_token_id = next(
        (token_id for token_id in (tokenizer.pad_token_id, context_token_id) if token_id is not None), 0
    )

    device = _model_device(model)
    total_nll = 0.0
    num_tokens = 0
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(windows), desc=progress_label, unit="window", disable=None if progress else True)
    try:
        with torch.no_grad():
            for input_ids, attention_mask, labels in _batches(windows, batch_size, pad_token_id, device):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                for row in range(logits.shape[0]):  # one row at a time: float32 logits of a whole batch are large
                    targets = labels[row, 1:]
                    total_nll += F.cross_entropy(
                        logits[row, :-1].float(), targets, ignore_index=-100, reduction="sum"
                    ).item()
                    num_tokens += int((targets != -100).sum())
                progress.update(input_ids.shape[0])
    finally:
        progress.close()
        model.train(was_training)

    loss = total_nll / num_tokens
    return {
        "perplexity": math.exp(loss),
        "bits_per_character": total_nll / math.log(2) / num_characters if num_characters else math.nan,
        "loss": loss,
        "num_tokens": num_tokens,
        "num_characters": num_characters,
    }


def evaluate_adapters(
    base_model_path: str,
    adapters: dict[str, str | os.PathLike],
    texts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    bf16: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict]:
    """Perplexity and bits per character of the base model and of each PEFT adapter folder on `texts`.

    Args:
        cache_dir: keep the base model's scores here, keyed by the content of the base model's files, the texts and
            the options (`batch_size` does not change a score), so scoring several adapters one call at a time
            scores the base model once. None: no cache.

    Returns:
        `{"base": metrics, name: metrics, ...}` with the metrics of `evaluate_language_model`.
    """
    from .base_model import load_base_model

    base_model, tokenizer = load_base_model(base_model_path)
    options = {"max_length": max_length, "batch_size": batch_size, "autocast_dtype": torch.bfloat16 if bf16 else None}
    count = len(adapters) + 1
    cache_file = None
    if cache_dir is not None:
        key = _score_key(base_model_path, texts, {"max_length": max_length, "bf16": bf16})
        cache_file = Path(cache_dir).expanduser() / f"base-{key}.json"
    if cache_file is not None and cache_file.is_file():
        results = {"base": read_json(cache_file, what="cached base-model score")}
        logger.info("Base-model score read from the cache %s", cache_file)
    else:
        results = {
            "base": evaluate_language_model(
                base_model, tokenizer, texts, progress_label=f"[1/{count}] base", **options
            )
        }
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(results["base"], cache_file)
    model = base_model
    for index, (name, path) in enumerate(adapters.items(), start=2):
        model = load_adapter_checked(model, path, name, base_model_path)
        results[name] = evaluate_language_model(
            model, tokenizer, texts, progress_label=f"[{index}/{count}] {name}", **options
        )
    return results


def compare_to_first(results: dict[str, dict]) -> dict[str, dict]:
    """For each model of `evaluate_adapters`' results: its perplexity over the first adapter's, and the share of the
    first adapter's gain over the base model that it recovers (in log-perplexity: 1 = as good as the first adapter,
    0 = no better than the base model). Typically the first adapter is the original LoRA, the others generated ones."""
    names = [name for name in results if name != "base"]
    if not names:
        return {}
    base, first = results["base"], results[names[0]]
    gain = base["loss"] - first["loss"]
    return {
        name: {
            "perplexity_vs_first": metrics["perplexity"] / first["perplexity"],
            "gain_recovered": (base["loss"] - metrics["loss"]) / gain if abs(gain) > 1e-12 else None,
        }
        for name, metrics in results.items()
    }


def _score_key(base_model_path: str, texts: list[str], options: dict) -> str:
    """A hash of what a base-model score depends on: the model's files (contents), the texts and the options."""
    digest = hashlib.sha256(json.dumps([SCORE_CACHE_VERSION, options, texts]).encode())
    folder = Path(base_model_path).expanduser()
    if folder.is_dir():
        for file in sorted(path for path in folder.rglob("*") if path.is_file()):
            digest.update(str(file.relative_to(folder)).encode())
            digest.update(sha256_file(file).encode())
    else:
        digest.update(base_model_path.encode())  # a Hub id: its name
    return digest.hexdigest()[:24]


def load_adapter_checked(model, path, name: str, base_model_path: str):
    """Add the PEFT adapter at `path` to `model` (a base model or a PeftModel) as `name` and make it active.

    Unlike `PeftModel.from_pretrained`, which only warns about missing keys, every LoRA tensor of the model's new
    adapter must be filled from the file and every tensor of the file must be used; anything else is a clear error.
    """
    from peft import PeftConfig, PeftModel, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from .errors import LayoutMismatchError

    try:
        config = PeftConfig.from_pretrained(str(path))
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
        else:
            model = get_peft_model(model, config, adapter_name=name)
        result = set_peft_model_state_dict(model, load_peft_weights(str(path)), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, target modules not in the model, ...
        raise LayoutMismatchError(
            f"The adapter {path} does not fit the base model {base_model_path}: {str(error).splitlines()[0]} "
            "Evaluate it with the base model it was trained for."
        ) from error
    missing = [key for key in result.missing_keys if f".{name}." in key and "lora_" in key]
    if missing or result.unexpected_keys:
        raise LayoutMismatchError(
            f"The adapter {path} does not fit the base model {base_model_path} ({len(missing)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys). Evaluate it with the base model it was trained for."
        )
    model.set_adapter(name)
    return model


@cache
def _metric_class():
    """Define the `evaluate.Metric` subclass; only on demand, as importing `evaluate` and `datasets` takes seconds."""
    import datasets
    import evaluate

    class LanguageModelMetric(evaluate.Metric):
        """`evaluate_language_model` as an `evaluate.Metric`: `predictions` are the texts to score."""

        def _info(self):
            return evaluate.MetricInfo(
                description="Perplexity and bits per character of a causal language model on texts.",
                citation="",
                inputs_description="predictions: list of texts; model, tokenizer and options as keywords.",
                features=datasets.Features({"predictions": datasets.Value("string")}),
            )

        def _compute(self, predictions, model=None, tokenizer=None, **options):
            if model is None or tokenizer is None:
                raise ValueError(
                    "This metric needs the model and its tokenizer: "
                    "metric.compute(predictions=texts, model=model, tokenizer=tokenizer)."
                )
            return evaluate_language_model(model, tokenizer, list(predictions), **options)

    LanguageModelMetric.__module__ = __name__
    return LanguageModelMetric


def language_model_metric(**metric_options):
    """`evaluate_language_model` as an `evaluate.Metric` instance, for code that expects one (no Hub access needed).

    Example:
        ```python
        metric = language_model_metric()
        metric.compute(predictions=texts, model=model, tokenizer=tokenizer, max_length=128)
        ```

    `predictions` are the texts to score; the other keywords of `compute` go to `evaluate_language_model`.
    `metric_options` go to `evaluate.Metric` (e.g. `experiment_id`, `keep_in_memory`).
    """
    return _metric_class()(**metric_options)
