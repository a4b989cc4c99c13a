"""Scoring a causal LM on prompt/answer tasks: answer NLL per token and multiple-choice accuracy by log-likelihood.

`evaluate_language_model` scores documents; a task of prompt/answer pairs (a BIG-bench task, or any `TaskData` with
`examples`) is scored on its answers only, the way its LoRA was trained (`peft_cvae.collect`):

- The prompt is `input_prefix + input + output_prefix` and the answer is `target`; both are tokenized separately
  (no special tokens) and joined, exactly as the collection path builds its training sequences, so the scored
  answer tokens are the trained ones. The EOS token the training appends is not scored: the metric is about the
  answer's text.
- **Answer NLL per token**: the summed negative log-likelihood of all answer tokens over all examples, divided by
  the number of answer tokens (nats). Lower is better; it is the metric to read first on small models, where accuracy
  on a few dozen examples is noisy.
- **Accuracy** (multiple-choice examples, those with `choices`): every choice is scored as an answer, and the example
  counts as correct when the choice with the highest summed log-likelihood is the target (BIG-bench's default
  multiple-choice rule). Ties go to the choice listed first.

Sequences are left-padded (with position ids counted over real tokens only, so padding never changes a score) and
only the last positions' logits are computed (`logits_to_keep`), which skips most of the LM head's cost.

**Shared prompts.** The choices of a multiple-choice example share its prompt, and the prompt is most of the tokens
(a BIG-bench prompt of 200 tokens, 60 one-word choices). So each prompt is run once, with the model's key/value cache
kept, and all its choices are scored from that cache in one more pass over the answer tokens only (none at all when
every answer is one token: the prompt's last logits score them). The numbers are those of one full pass per choice
up to float rounding; `share_prompts=False`, or a model that returns no cache, takes the full passes.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["evaluate_answers"]

DEFAULT_INPUT_PREFIX = "\nQ: "  # BIG-bench's default example_input_prefix / example_output_prefix
DEFAULT_OUTPUT_PREFIX = "\nA: "


@dataclass
class _Sequence:
    example: int  # index of the example it belongs to
    choice: int | None  # index of the choice it scores, None for a generative example
    is_target: bool
    prompt: list[int]
    answer: list[int]


def _fields(example) -> tuple[str, str, list[str] | None]:
    """(input, target, choices) of a `TaskExample` or of a dict with those keys."""
    if isinstance(example, dict):
        values = example.get("input"), example.get("target"), example.get("choices")
    else:
        values = getattr(example, "input", None), getattr(example, "target", None), getattr(example, "choices", None)
    text, target, choices = values
    if not isinstance(text, str) or not isinstance(target, str) or not target:
        raise TypeError(
            f"Each example needs a string 'input' and a non-empty string 'target' (a TaskExample or a dict), got "
            f"{example!r:.100}."
        )
    if choices is not None and (
        not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices)
    ):
        raise TypeError(f"The 'choices' of an example must be a list of strings, got {choices!r:.100}.")
    return text, target, list(choices) if choices else None


def _sequences(tokenizer, examples, input_prefix: str, output_prefix: str, max_length: int | None) -> list[_Sequence]:
    sequences = []
    for index, example in enumerate(examples):
        text, target, choices = _fields(example)
        prompt = tokenizer(input_prefix + text + output_prefix, add_special_tokens=False)["input_ids"]
        if not prompt:
            raise ValueError(
                f"Example {index} has an empty prompt (input and prefixes), so its answer's first token has nothing "
                "to be predicted from. Give it an input or an input_prefix / output_prefix."
            )
        answers = choices if choices else [target]
        if choices and target not in choices:
            answers = [*choices, target]
        for choice, answer_text in enumerate(answers):
            answer = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
            if not answer:
                raise ValueError(f"The answer {answer_text!r} of example {index} has no tokens; it cannot be scored.")
            kept_prompt = prompt
            if max_length is not None and len(prompt) + len(answer) > max_length:
                # at least one prompt token stays: it predicts the first answer token
                answer = answer[: max_length - 1]
                kept_prompt = prompt[len(prompt) - (max_length - len(answer)) :]
            sequences.append(_Sequence(index, choice if choices else None, answer_text == target, kept_prompt, answer))
    return sequences


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _batch(sequences: list[_Sequence], pad_token_id: int, device):
    """Left-padded (B, T) input ids, attention mask and position ids; answers end every row."""
    width = max(len(s.prompt) + len(s.answer) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids = sequence.prompt + sequence.answer
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # counted over real tokens only
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def _pack(groups: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive groups into batches of at most `batch_size` answers (a group is never split across batches)."""
    batches, current, count = [], [], 0
    for group in groups:
        if current and count + len(group) > batch_size:
            batches.append(current)
            current, count = [], 0
        current.append(group)
        count += len(group)
    return batches + [current] if current else batches


def _answer_log_likelihoods(model, sequences, pad_token_id, autocast_dtype) -> torch.Tensor:
    """Summed log-likelihood of each sequence's answer tokens given its prompt, shape (B,), float64."""
    device = _model_device(model)
    input_ids, attention_mask, position_ids = _batch(sequences, pad_token_id, device)
    keep = max(len(s.answer) for s in sequences) + 1  # the positions that predict the answers, plus one
    keep = min(keep, input_ids.shape[1])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = _forward(model, {**inputs, "use_cache": False}, keep).logits  # (B, keep, V)
    scores = torch.zeros(len(sequences), dtype=torch.float64)
    for row, sequence in enumerate(sequences):
        count = len(sequence.answer)
        predicting = logits[row, keep - count - 1 : keep - 1].float()  # (count, V): position t predicts token t+1
        targets = torch.tensor(sequence.answer, device=predicting.device)
        scores[row] = -F.cross_entropy(predicting, targets, reduction="sum").double().cpu()
    return scores


def _forward(model, inputs: dict, keep: int):
    """The model's output with the logits of the last `keep` positions only, where the model accepts that."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep: compute every position, keep the last ones
        output = model(**inputs)
        output.logits = output.logits[:, -keep:]
        return output


def _cache_argument(model) -> str:
    """The name under which the model's forward takes a key/value cache: `cache` since transformers 5.2x, before
    that `past_key_values` (still accepted, with a deprecation warning)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes it through
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _prompt_groups(sequences: list[_Sequence], size: int) -> list[list[int]]:
    """Indices of the sequences in groups that share one prompt (the choices of an example, unless `max_length` cut
    their prompts differently), at most `size` per group, longest prompts first."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for index, sequence in enumerate(sequences):
        groups.setdefault((sequence.example, tuple(sequence.prompt)), []).append(index)
    chunks = [rows[start : start + size] for rows in groups.values() for start in range(0, len(rows), size)]
    return sorted(chunks, key=lambda rows: -len(sequences[rows[0]].prompt))


def _shared_prompt_log_likelihoods(model, sequences, groups: list[list[int]], pad_token_id, autocast_dtype):
    """Summed answer log-likelihoods of the sequences of `groups` (each group one prompt), shape (sum of group sizes,)
    float64 in the groups' order, from one pass over the prompts (their cache kept) and one over the answers; None
    when the model returns no key/value cache."""
    device = _model_device(model)
    prompts = [_Sequence(0, None, False, sequences[rows[0]].prompt, []) for rows in groups]
    input_ids, attention_mask, position_ids = _batch(prompts, pad_token_id, device)  # (G, P)
    rows = [row for group in groups for row in group]
    owner = torch.tensor([number for number, group in enumerate(groups) for _ in group], device=device)  # (N,)
    answers = [sequences[row].answer for row in rows]
    width = max(len(answer) for answer in answers) - 1  # answer tokens that predict a next one
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        output = _forward(model, {**inputs, "use_cache": True}, keep=1)
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None or not hasattr(cache, "reorder_cache"):
            return None
        first = output.logits[:, -1].float().log_softmax(dim=-1)[owner]  # (N, V): predicts each answer's 1st token
        if width > 0:
            cache.reorder_cache(owner)  # one copy of its prompt's keys and values per answer
            tails = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            tail_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, answer in enumerate(answers):
                tails[row, : len(answer) - 1] = torch.tensor(answer[:-1], dtype=torch.long)
                tail_mask[row, : len(answer) - 1] = 1
            prompt_lengths = attention_mask.sum(dim=-1)[owner]  # (N,)
            inputs = {
                "input_ids": tails.to(device),  # (N, W): right-padded, so padding only follows real tokens
                "attention_mask": torch.cat([attention_mask[owner], tail_mask.to(device)], dim=-1),  # (N, P + W)
                "position_ids": prompt_lengths[:, None] + torch.arange(width, device=device)[None],  # (N, W)
                _cache_argument(model): cache,
                "use_cache": True,
            }
            rest = model(**inputs).logits  # (N, W, V): position t predicts answer token t + 1
    scores = torch.zeros(len(rows), dtype=torch.float64)
    for row, answer in enumerate(answers):
        score = first[row, answer[0]]
        if len(answer) > 1:
            targets = torch.tensor(answer[1:], device=rest.device)
            score = score - F.cross_entropy(rest[row, : len(answer) - 1].float(), targets, reduction="sum")
        scores[row] = score.double().cpu()
    return scores


def evaluate_answers(
    model,
    tokenizer,
    examples,
    *,
    input_prefix: str | None = None,
    output_prefix: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = True,
    desc: str = "Scoring answers",
    share_prompts: bool = True,
) -> dict:
    """Score a causal LM on prompt/answer examples: answer NLL per token and multiple-choice accuracy.

    Args:
        model: a causal LM returning `logits` (a transformers `...ForCausalLM`, a `peft.PeftModel`); put in eval
            mode for the call, its mode restored after.
        tokenizer: its tokenizer.
        examples: a `TaskData` with `examples` (its prefixes are used), or a list of `TaskExample`s or dicts with
            `input`, `target` and optional `choices`.
        input_prefix, output_prefix: the prompt is `input_prefix + input + output_prefix` (default: the `TaskData`'s
            prefixes, else BIG-bench's `"\\nQ: "` and `"\\nA: "`).
        batch_size: answers (one per choice) per forward pass; does not change the result.
        max_length: cut the start of prompts so that prompt + answer fit in this many tokens (None: no cut); an
            answer longer than that keeps its first `max_length - 1` tokens after the prompt's last one.
        autocast_dtype: run the forward passes under `torch.autocast` with this dtype (log-likelihoods in float32).
        show_progress: show a tqdm bar over batches.
        desc: the bar's label.
        share_prompts: run each prompt once and score its answers from the model's key/value cache (the same
            numbers up to float rounding, several times faster on multiple-choice tasks); False: one full pass per
            answer.

    Returns:
        A dict: `answer_nll` (nats per answer token), `num_tokens`, `num_examples`, `accuracy` (share of
        multiple-choice examples answered right, None without any), `num_multiple_choice`, and per example
        `example_nll` (summed over its answer tokens), `example_tokens` and `example_correct` (None for generative).

    Example:
        ```python
        task = read_task_spec("tasks.json")[0]
        evaluate_answers(model, tokenizer, task)  # {"answer_nll": 1.23, "accuracy": 0.61, ...}
        ```
    """
    if hasattr(examples, "examples") and hasattr(examples, "input_prefix"):  # a TaskData
        input_prefix = examples.input_prefix if input_prefix is None else input_prefix
        output_prefix = examples.output_prefix if output_prefix is None else output_prefix
        if examples.examples is None:
            raise TypeError(f"Task {examples.name!r} holds documents (texts); use evaluate_language_model for those.")
        examples = examples.examples
    input_prefix = DEFAULT_INPUT_PREFIX if input_prefix is None else input_prefix
    output_prefix = DEFAULT_OUTPUT_PREFIX if output_prefix is None else output_prefix
    if isinstance(examples, (str, dict)) or not examples:
        raise ValueError("examples must be a non-empty list of examples (TaskExample or dicts), or a TaskData.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}.")
    examples = list(examples)
    sequences = _sequences(tokenizer, examples, input_prefix, output_prefix, max_length)
    pad_token_id = next(
        (
            t
            for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(tokenizer, "unk_token_id", None))
            if t is not None
        ),
        0,
    )  # masked out anyway

    log_likelihoods = torch.zeros(len(sequences), dtype=torch.float64)
    groups = _prompt_groups(sequences, batch_size) if share_prompts else []
    shared_batches = _pack([group for group in groups if len(group) > 1], batch_size)
    # An answer alone with its prompt (a generative example) has nothing to share: one full pass is cheaper.
    full = [group[0] for group in groups if len(group) == 1] if share_prompts else list(range(len(sequences)))
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(sequences), desc=desc, unit="answer", leave=False, disable=not show_progress or None)
    try:
        with torch.no_grad():
            for batch in shared_batches:
                rows = [row for group in batch for row in group]
                scores = _shared_prompt_log_likelihoods(model, sequences, batch, pad_token_id, autocast_dtype)
                if scores is None:  # this model returns no key/value cache: full passes for everything
                    full = list(range(len(sequences)))
                    break
                log_likelihoods[rows] = scores
                bar.update(len(rows))
            bar.reset()
            bar.update(len(sequences) - len(full))
            full.sort(key=lambda i: -len(sequences[i].prompt + sequences[i].answer))
            for start in range(0, len(full), batch_size):
                rows = full[start : start + batch_size]
                scores = _answer_log_likelihoods(model, [sequences[i] for i in rows], pad_token_id, autocast_dtype)
                log_likelihoods[rows] = scores
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)

    example_nll = [0.0] * len(examples)
    example_tokens = [0] * len(examples)
    best: dict[int, tuple[float, bool]] = {}
    for index, sequence in enumerate(sequences):
        score = float(log_likelihoods[index])
        if sequence.is_target and (sequence.choice is None or example_tokens[sequence.example] == 0):
            example_nll[sequence.example] = -score
            example_tokens[sequence.example] = len(sequence.answer)
        if sequence.choice is not None:
            current = best.get(sequence.example)
            if current is None or score > current[0]:
                best[sequence.example] = (score, sequence.is_target)
    example_correct = [best[i][1] if i in best else None for i in range(len(examples))]
    num_tokens = sum(example_tokens)
    judged = [correct for correct in example_correct if correct is not None]
    return {
        "answer_nll": sum(example_nll) / num_tokens if num_tokens else math.nan,
        "num_tokens": num_tokens,
        "num_examples": len(examples),
        "accuracy": sum(judged) / len(judged) if judged else None,
        "num_multiple_choice": len(judged),
        "example_nll": example_nll,
        "example_tokens": example_tokens,
        "example_correct": example_correct,
    }
