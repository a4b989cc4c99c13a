"""Tests of `peft_cvae.evaluation` on a tiny Llama and a character-level tokenizer built in the test (no download)."""

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from peft_cvae.evaluation import evaluate_language_model, language_model_metric
from peft_cvae.testing_utils import tiny_llama

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
TEXTS = [
    "the cat sat on the mat.",
    "a dog ran after the ball,\nand the cat watched.",
    "the end.",
    "once upon a time there was a quiet little town by the sea, and the people there liked the cat.",
]


def make_tokenizer(special_tokens: bool = True) -> PreTrainedTokenizerFast:
    """One token per character, plus <pad>, <s>, </s> and [UNK]."""
    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "[UNK]", *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if not special_tokens:
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed, vocab_size=vocab_size, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(len(tokenizer))


def test_tokenizer_is_character_level(tokenizer):
    ids = tokenizer("the cat.\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("the cat.\n")
    assert tokenizer.unk_token_id not in ids


def test_perplexity_matches_the_loss_of_one_unpadded_batch(model, tokenizer):
    texts = ["the cat sat", "dogs ran on"]  # two texts of 11 characters: no padding anywhere
    assert len(texts[0]) == len(texts[1])
    result = evaluate_language_model(model, tokenizer, texts, max_length=64, batch_size=2)

    input_ids = torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in texts]
    )
    with torch.no_grad():
        mean_loss = model(input_ids=input_ids, labels=input_ids).loss.item()  # transformers' own loss
    assert result["num_tokens"] == 2 * 11
    assert result["loss"] == pytest.approx(mean_loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(mean_loss), rel=1e-6)


def test_padding_and_batch_size_do_not_change_the_result(model, tokenizer):
    one = evaluate_language_model(model, tokenizer, TEXTS, max_length=32, batch_size=1)
    four = evaluate_language_model(model, tokenizer, TEXTS, max_length=32, batch_size=4)
    assert one["num_tokens"] == four["num_tokens"]
    assert one["perplexity"] == pytest.approx(four["perplexity"], rel=1e-5)
    assert one["bits_per_character"] == pytest.approx(four["bits_per_character"], rel=1e-5)


@pytest.mark.parametrize("max_length", [2, 7, 16, 256])
def test_every_character_is_predicted_exactly_once(model, tokenizer, max_length):
    result = evaluate_language_model(model, tokenizer, TEXTS, max_length=max_length)
    characters = sum(len(text) for text in TEXTS)
    assert result["num_tokens"] == characters  # one token per character, the first one predicted from <s>
    assert result["num_characters"] == characters


def test_a_smaller_stride_scores_the_same_tokens(model, tokenizer):
    full = evaluate_language_model(model, tokenizer, TEXTS, max_length=16)
    overlapping = evaluate_language_model(model, tokenizer, TEXTS, max_length=16, stride=4)
    assert overlapping["num_tokens"] == full["num_tokens"]
    assert overlapping["num_characters"] == full["num_characters"]


def test_bits_per_character_is_consistent_with_the_loss(model, tokenizer):
    result = evaluate_language_model(model, tokenizer, TEXTS, max_length=32)
    total_nll = result["loss"] * result["num_tokens"]
    assert result["num_characters"] == sum(len(text) for text in TEXTS)
    assert result["bits_per_character"] == pytest.approx(total_nll / math.log(2) / result["num_characters"])
    assert math.log(result["perplexity"]) == pytest.approx(result["loss"])


def test_without_bos_or_eos_the_first_character_is_not_scored(tokenizer):
    bare = make_tokenizer(special_tokens=False)
    model = make_model(len(tokenizer))
    result = evaluate_language_model(model, bare, TEXTS, max_length=32)
    assert result["num_tokens"] == sum(len(text) - 1 for text in TEXTS)
    assert result["num_characters"] == sum(len(text) - 1 for text in TEXTS)


def test_training_on_the_texts_lowers_perplexity(tokenizer):
    model = make_model(len(tokenizer), seed=1)
    before = evaluate_language_model(model, tokenizer, TEXTS, max_length=64)
    batch = tokenizer([tokenizer.bos_token + text for text in TEXTS], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate_language_model(model, tokenizer, TEXTS, max_length=64)
    assert model.training, "the model's training mode must be restored"
    assert after["perplexity"] < 0.7 * before["perplexity"]
    assert after["bits_per_character"] < before["bits_per_character"]


def test_works_on_a_peft_model_and_under_autocast(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = evaluate_language_model(model, tokenizer, TEXTS, max_length=32)
    peft_model = get_peft_model(make_model(len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with_lora = evaluate_language_model(peft_model, tokenizer, TEXTS, max_length=32)
    assert with_lora["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)  # LoRA B starts at zero
    autocast = evaluate_language_model(peft_model, tokenizer, TEXTS, max_length=32, autocast_dtype=torch.bfloat16)
    assert autocast["perplexity"] == pytest.approx(base["perplexity"], rel=0.05)


def test_empty_texts_contribute_nothing(model, tokenizer):
    plain = evaluate_language_model(model, tokenizer, TEXTS)
    with_empty = evaluate_language_model(model, tokenizer, ["", *TEXTS, ""])
    assert with_empty == pytest.approx(plain)


def test_evaluate_metric_wrapper(model, tokenizer, tmp_path):
    metric = language_model_metric(cache_dir=str(tmp_path))
    result = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, max_length=32)
    assert result["perplexity"] == pytest.approx(
        evaluate_language_model(model, tokenizer, TEXTS, max_length=32)["perplexity"]
    )


@pytest.mark.parametrize(
    ("texts", "options", "error", "message"),
    [
        ("one string", {}, TypeError, "Wrap it in a list"),
        ([[1, 2, 3]], {}, TypeError, "not token ids"),
        ([], {}, ValueError, "texts is empty"),
        (["", ""], {}, ValueError, "every text is empty"),
        (TEXTS, {"max_length": 1}, ValueError, "max_length must be an integer >= 2"),
        (TEXTS, {"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
        (TEXTS, {"max_length": 8, "stride": 8}, ValueError, "stride must be an integer from 1 to max_length - 1 = 7"),
    ],
)
def test_mistakes_are_explained(model, tokenizer, texts, options, error, message):
    with pytest.raises(error, match=message):
        evaluate_language_model(model, tokenizer, texts, **options)


def test_a_tokenizer_with_start_tokens_gets_them_in_front_of_every_window():
    """Gemma-style: the tokenizer puts <s> in front of every text, so the model only ever saw sequences starting with
    it; a window cut from the middle of a text gets it too, unscored."""
    from tokenizers import processors

    tokenizer = make_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert tokenizer("ab")["input_ids"] == [bos, *tokenizer("ab", add_special_tokens=False)["input_ids"]]
    model = make_model(len(tokenizer))
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    text = "the cat sat."  # 12 characters: windows of 6 tokens
    try:
        result = evaluate_language_model(model, tokenizer, [text], max_length=6, batch_size=1)
    finally:
        hook.remove()
    assert result["num_tokens"] == len(text) == result["num_characters"]  # every character predicted exactly once
    assert len(seen) > 2 and all(int(batch[0, 0]) == bos for batch in seen)  # every window starts with <s>

    # by hand: windows of max_length 6 whose later ones hold <s> + 5 text tokens and start 4 tokens apart (overlap 1)
    ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]  # 13 tokens
    expected = [  # (window, first scored position in it)
        (ids[0:6], 1),  # the text's own context token, then tokens 1-5 scored
        ([bos, *ids[5:10]], 2),  # token 5 is context, 6-9 scored
        ([bos, *ids[9:13]], 2),  # token 9 is context, 10-12 scored
    ]
    assert [batch[0].tolist() for batch in seen] == [window for window, _ in expected]
    total = 0.0
    for window, first_scored in expected:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0]
        targets = torch.tensor(window[first_scored:])
        total += torch.nn.functional.cross_entropy(logits[first_scored - 1 : -1], targets, reduction="sum").item()
    assert result["loss"] == pytest.approx(total / len(text), rel=1e-5)
    with pytest.raises(ValueError, match="max_length >= 3"):
        evaluate_language_model(model, tokenizer, [text], max_length=2)
