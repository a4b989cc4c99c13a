"""evaluate_answers: answer NLL per token and multiple-choice accuracy, checked against a plain forward pass."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peft_cvae.answer_evaluation import evaluate_answers
from peft_cvae.testing_utils import TINY_CAUSAL_LM_FAMILIES, tiny_causal_lm, tiny_llama

EXAMPLES = [
    {"input": "2 + 2", "target": "4"},
    {"input": "what colour is the sky", "target": "blue on a clear day"},
    {"input": "is fire cold", "target": "no", "choices": ["yes", "no"]},
    {"input": "pick the fruit", "target": "apple", "choices": ["stone", "apple", "chair and table"]},
]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator([e["input"] + " " + e["target"] for e in EXAMPLES] * 3, trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special, pad_token=special)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = byte_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer)), tokenizer


def manual_log_likelihood(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    """Sum of log p(answer tokens | prompt) from one unpadded forward pass over the whole sequence."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    total = sum(float(log_probs[len(prompt_ids) - 1 + i, token]) for i, token in enumerate(answer_ids))
    return total, len(answer_ids)


def test_scores_equal_an_unpadded_forward_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = evaluate_answers(model, tokenizer, EXAMPLES, batch_size=3, show_progress=False)
    total_nll, total_tokens = 0.0, 0
    for index, example in enumerate(EXAMPLES):
        prompt = "\nQ: " + example["input"] + "\nA: "
        log_likelihood, count = manual_log_likelihood(model, tokenizer, prompt, example["target"])
        assert result["example_nll"][index] == pytest.approx(-log_likelihood, rel=1e-4, abs=1e-4)
        assert result["example_tokens"][index] == count
        total_nll, total_tokens = total_nll - log_likelihood, total_tokens + count
        if "choices" in example:
            scores = [manual_log_likelihood(model, tokenizer, prompt, c)[0] for c in example["choices"]]
            best = example["choices"][max(range(len(scores)), key=scores.__getitem__)]
            assert result["example_correct"][index] == (best == example["target"])
        else:
            assert result["example_correct"][index] is None
    assert result["answer_nll"] == pytest.approx(total_nll / total_tokens, rel=1e-4)
    assert result["num_tokens"] == total_tokens and result["num_examples"] == 4
    assert result["num_multiple_choice"] == 2
    assert result["accuracy"] == sum(c for c in result["example_correct"] if c is not None) / 2


def test_batch_size_and_padding_do_not_change_scores(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = evaluate_answers(model, tokenizer, EXAMPLES, batch_size=1, show_progress=False)
    many = evaluate_answers(model, tokenizer, EXAMPLES, batch_size=16, show_progress=False)
    assert many["example_nll"] == pytest.approx(one["example_nll"], rel=1e-4, abs=1e-4)
    assert many["example_correct"] == one["example_correct"]
    assert math.isfinite(one["answer_nll"]) and one["answer_nll"] > 0


def test_task_data_prefixes_are_used(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    class Task:  # duck-typed TaskData
        name = "t"
        input_prefix = "Question: "
        output_prefix = " Answer:"
        examples = EXAMPLES[:2]

    result = evaluate_answers(model, tokenizer, Task(), show_progress=False)
    expected, _ = manual_log_likelihood(model, tokenizer, "Question: 2 + 2 Answer:", "4")
    assert result["example_nll"][0] == pytest.approx(-expected, rel=1e-4, abs=1e-4)
    assert result["accuracy"] is None  # no multiple-choice example


def test_a_model_that_learned_the_answers_scores_better(model_and_tokenizer):
    """Fit the tiny model on the answers: NLL falls and the multiple-choice examples are answered right."""
    model, tokenizer = model_and_tokenizer
    model = tiny_llama(vocab_size=len(tokenizer), seed=1)
    before = evaluate_answers(model, tokenizer, EXAMPLES, show_progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        for example in EXAMPLES:
            prompt = tokenizer("\nQ: " + example["input"] + "\nA: ", add_special_tokens=False)["input_ids"]
            answer = tokenizer(example["target"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            model.train()
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = evaluate_answers(model, tokenizer, EXAMPLES, show_progress=False)
    assert after["answer_nll"] < 0.5 * before["answer_nll"]
    assert after["accuracy"] == 1.0


def test_max_length_cuts_the_prompt_start_not_the_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long = [{"input": "word " * 40, "target": "blue on a clear day"}]
    result = evaluate_answers(model, tokenizer, long, max_length=12, show_progress=False)
    assert result["example_tokens"][0] == len(tokenizer("blue on a clear day", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "examples, message",
    [
        ([], "non-empty"),
        ("a string", "non-empty"),
        ([{"input": "x"}], "target"),
        ([{"input": "x", "target": ""}], "target"),
    ],
)
def test_bad_examples_are_refused_clearly(model_and_tokenizer, examples, message):
    model, tokenizer = model_and_tokenizer
    with pytest.raises((ValueError, TypeError), match=message):
        evaluate_answers(model, tokenizer, examples, show_progress=False)


MANY_CHOICES = [
    *EXAMPLES,
    {"input": "name a colour " * 3, "target": "blue", "choices": ["red", "blue", "green and yellow", "the sky", "x"]},
    {"input": "which is a word", "target": "apple tree", "choices": ["stone", "table", "chair"]},  # target added
]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_shared_prompts_score_as_full_passes(model_and_tokenizer, batch_size):
    """One pass over each prompt with its key/value cache reused for every choice: the scores of a full pass per
    choice, whatever the batch size (groups larger than a batch are split, each part runs its prompt again)."""
    model, tokenizer = model_and_tokenizer
    full = evaluate_answers(model, tokenizer, MANY_CHOICES, batch_size=4, share_prompts=False, show_progress=False)
    shared = evaluate_answers(model, tokenizer, MANY_CHOICES, batch_size=batch_size, show_progress=False)
    assert shared["example_nll"] == pytest.approx(full["example_nll"], rel=1e-5, abs=1e-5)
    assert shared["example_correct"] == full["example_correct"]
    assert shared["answer_nll"] == pytest.approx(full["answer_nll"], rel=1e-5)


@pytest.mark.parametrize("family", sorted(TINY_CAUSAL_LM_FAMILIES))
def test_shared_prompts_on_every_model_family(model_and_tokenizer, family):
    """Each family's cache (GPT-2's, Gemma-3's sliding layers, ...) is reused: the model sees fewer tokens, and the
    scores are a full pass's."""
    _, tokenizer = model_and_tokenizer
    model = tiny_causal_lm(family, 0, len(tokenizer))
    tokens = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True)
    full = evaluate_answers(model, tokenizer, MANY_CHOICES, share_prompts=False, show_progress=False)
    full_tokens, tokens[:] = sum(tokens), []
    shared = evaluate_answers(model, tokenizer, MANY_CHOICES, show_progress=False)
    hook.remove()
    assert sum(tokens) < 0.6 * full_tokens
    assert shared["example_nll"] == pytest.approx(full["example_nll"], rel=1e-5, abs=1e-5)
    assert shared["example_correct"] == full["example_correct"]


def test_shared_prompts_with_prompts_cut_differently_per_choice(model_and_tokenizer):
    """max_length cuts a long prompt by its answer's length, so the choices of one example have different prompts:
    they are grouped apart and still score as full passes; an answer that fills max_length has no prompt left."""
    model, tokenizer = model_and_tokenizer
    long = [
        {"input": "word " * 20, "target": "no", "choices": ["yes", "no", "green and yellow and blue"]},
        {"input": "word " * 20, "target": "blue on a clear day"},
    ]
    for max_length in (8, 4):
        full = evaluate_answers(
            model, tokenizer, long, max_length=max_length, share_prompts=False, show_progress=False
        )
        shared = evaluate_answers(model, tokenizer, long, max_length=max_length, show_progress=False)
        assert shared["example_nll"] == pytest.approx(full["example_nll"], rel=1e-5, abs=1e-5)
        assert shared["example_correct"] == full["example_correct"]


def test_shared_prompts_through_a_peft_model(model_and_tokenizer):
    """A PeftModel passes the cache through to its base model; a non-zero LoRA changes the scores in both paths."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    base = evaluate_answers(model, tokenizer, MANY_CHOICES, show_progress=False)
    full = evaluate_answers(peft_model, tokenizer, MANY_CHOICES, share_prompts=False, show_progress=False)
    shared = evaluate_answers(peft_model, tokenizer, MANY_CHOICES, show_progress=False)
    assert shared["example_nll"] == pytest.approx(full["example_nll"], rel=1e-5, abs=1e-5)
    assert abs(shared["answer_nll"] - base["answer_nll"]) > 1e-3


class NoCacheModel(torch.nn.Module):
    """A causal LM that returns logits only (no key/value cache), as some custom models do."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return SimpleNamespace(logits=logits)


def test_a_model_without_a_cache_gets_full_passes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = evaluate_answers(model, tokenizer, MANY_CHOICES, share_prompts=False, show_progress=False)
    result = evaluate_answers(NoCacheModel(model), tokenizer, MANY_CHOICES, show_progress=False)
    assert result["example_nll"] == pytest.approx(expected["example_nll"], rel=1e-5, abs=1e-5)
    assert result["example_correct"] == expected["example_correct"]


def test_an_empty_prompt_is_refused_clearly(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="empty prompt"):
        evaluate_answers(model, tokenizer, [{"input": "", "target": "x"}], input_prefix="", output_prefix="")
