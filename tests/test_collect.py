"""`peft_cvae.collect`: the one LoRA fine-tuning path (documents and prompt/answer tasks) and the task spec reader."""

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from peft import get_peft_model
from peft.utils import set_peft_model_state_dict
from transformers import PreTrainedTokenizerFast

from peft_cvae import LoraBank
from peft_cvae.collect import (
    CollectArguments,
    TaskData,
    TaskExample,
    _RightPadCollator,
    check_task_name,
    collect_bank,
    read_task_spec,
    sequence_prefix,
    task_dataset,
    train_task_lora,
)
from peft_cvae.collect_cost import estimate_collect_cost, kept_steps
from peft_cvae.errors import InvalidConfigError, PeftCVAEError
from peft_cvae.testing_utils import tiny_bpe_tokenizer, tiny_llama_for

CORPUS = [" ".join(str((i * 7 + k) % 100) for k in range(40)) for i in range(4)] + [
    "Q: what is 2 plus 3? A: 5",
    "the cat sat on the mat",
    "a dog ran in the park",
]
SUMS = [TaskExample(input=f"{a} plus {b}", target=str(a + b)) for a in range(1, 5) for b in range(1, 4)]
ARGS = {"steps": 12, "batch_size": 4, "max_length": 24, "lora_r": 2, "lr": 3e-2, "save_steps": 1}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with a few merges, trained in milliseconds."""
    return tiny_bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"  # a chat-style tokenizer: training batches must still be right-padded
    base = tiny_llama_for(tokenizer, initializer_range=0.3)
    return base, tokenizer


def test_example_labels_mask_exactly_the_prompt_and_the_padding(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    task = TaskData("sums", examples=[SUMS[0], TaskExample("a much longer question about 4 plus 3", "7")])
    dataset = task_dataset(task, tokenizer, max_length=64)
    batch = _RightPadCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    for row, example in enumerate(task.examples):
        prompt = tokenizer(task.prompt(example), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = len(prompt) + len(answer)
        assert batch["input_ids"][row, :length].tolist() == prompt + answer  # right-padded: real tokens first
        assert batch["labels"][row, : len(prompt)].eq(-100).all()
        assert batch["labels"][row, len(prompt) : length].tolist() == answer
        assert batch["labels"][row, length:].eq(-100).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
    assert task.prompt(SUMS[0]) == "\nQ: 1 plus 1\nA: "  # BIG-bench's default prefixes


def test_too_long_examples_lose_the_start_of_the_prompt(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    example = TaskExample(" ".join(["the cat sat on the mat"] * 10), "a dog ran in the park")
    answer = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer(TaskData("x", examples=[example]).prompt(example), add_special_tokens=False)["input_ids"]
    max_length = len(answer) + 5
    item = task_dataset(TaskData("long", examples=[example]), tokenizer, max_length=max_length)[0]
    assert item["input_ids"].tolist() == prompt[-5:] + answer  # the end of the prompt and the whole answer
    assert item["labels"].tolist() == [-100] * 5 + answer


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a post-processor that puts its BOS in front of every text, as Gemma's does."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def test_blocks_and_examples_start_with_the_tokenizers_own_start_tokens():
    """Gemma-3 without its <bos> is another model (loss 6.5-9.0 vs 2.8-4.7 measured): every training block and
    example starts with what the tokenizer puts in front of a text; a tokenizer that adds nothing gets plain blocks."""
    plain, with_bos = tiny_tokenizer(), bos_tokenizer()
    assert sequence_prefix(plain) == [] and sequence_prefix(with_bos) == [with_bos.bos_token_id]
    texts = TaskData("text", texts=CORPUS)
    plain_blocks = [item["input_ids"] for item in task_dataset(texts, plain, max_length=8)]
    bos_blocks = [item["input_ids"] for item in task_dataset(texts, with_bos, max_length=8)]
    stream = torch.cat(plain_blocks).tolist()  # no prefix: the documents' tokens, joined by EOS, cut in blocks
    assert all(block.shape == (8,) and block[0] == with_bos.bos_token_id for block in bos_blocks)
    assert torch.cat([block[1:] for block in bos_blocks]).tolist() == stream[: 7 * len(bos_blocks)]

    task = TaskData("sums", examples=[SUMS[0]])
    item = task_dataset(task, with_bos, max_length=64)[0]
    prompt = with_bos(task.prompt(SUMS[0]), add_special_tokens=False)["input_ids"]
    assert item["input_ids"][: 1 + len(prompt)].tolist() == [with_bos.bos_token_id, *prompt]
    assert item["labels"][: 1 + len(prompt)].eq(-100).all() and item["labels"][1 + len(prompt) :].ne(-100).all()


def answer_nll(model, tokenizer, task: TaskData) -> float:
    """Mean NLL per answer token over the task's examples (prompt tokens not scored)."""
    batch = _RightPadCollator(tokenizer.pad_token_id)(list(task_dataset(task, tokenizer, 64)))
    with torch.no_grad():
        return model(**batch).loss.item()


def test_answer_only_training_lowers_the_answer_nll(model_and_tokenizer):
    base, tokenizer = model_and_tokenizer
    task = TaskData("sums", "adding small numbers", examples=SUMS)
    before = answer_nll(base, tokenizer, task)
    result = train_task_lora(base, tokenizer, task, CollectArguments(**{**ARGS, "steps": 30}, last_fraction=0.1))
    after = answer_nll(result.model.eval(), tokenizer, task)
    assert after < 0.6 * before
    assert result.steps == [28, 29, 30] and [c.step for c in result.bank.checkpoints_of("sums")] == [28, 29, 30]
    assert result.num_sequences == len(SUMS) and result.train_seconds > 0
    assert math.isfinite(result.loss) and result.loss < before
    assert result.bank.description("sums") == "adding small numbers"
    assert answer_nll(base, tokenizer, task) == pytest.approx(before)  # the base model itself was not changed


def test_answer_position_loss_trains_the_same_lora_as_the_full_logits_loss(model_and_tokenizer, monkeypatch):
    """Computing the LM head only at answer-predicting positions must not change a single trained number."""
    import peft_cvae.collect as collect_module

    base, tokenizer = model_and_tokenizer
    task = TaskData("sums", examples=SUMS + [TaskExample("a much longer question about 4 plus 3", "7")])
    args = CollectArguments(**{**ARGS, "steps": 4}, last_fraction=0.25)
    lean = train_task_lora(base, tokenizer, task, args)
    monkeypatch.setattr(collect_module, "_AnswerLossTrainer", collect_module.Trainer)  # transformers' own loss
    full = train_task_lora(base, tokenizer, task, args)
    lean_state, full_state = lean.model.state_dict(), full.model.state_dict()
    lora_keys = [key for key in lean_state if "lora_" in key]
    assert lora_keys and all(torch.equal(lean_state[key], full_state[key]) for key in lora_keys)
    assert lean.loss == full.loss and not torch.equal(
        lean_state[lora_keys[-1]], torch.zeros_like(full_state[lora_keys[-1]])
    )


def test_task_json_spec_round_trips(tmp_path):
    task_json = {
        "name": "toy_bigbench",
        "description": "Answer arithmetic and pick the animal.",
        "example_input_prefix": "\nQuestion: ",
        "example_output_prefix": "\nAnswer: ",
        "examples": [
            {"input": "What is 2 + 2?", "target": "4"},
            {"input": "What is 3 + 3?", "target": ["6", "six"]},
            {"input": "Which is an animal?", "target_scores": {"stone": 0, "cat": 1, "cloud": 0}},
        ],
    }
    (tmp_path / "bb").mkdir()
    (tmp_path / "bb" / "task.json").write_text(json.dumps(task_json))
    (tmp_path / "docs.txt").write_text("a document\n")
    spec = [
        {"name": "bb", "task_json": "bb/task.json"},
        {"task_json": "bb/task.json", "description": "overridden", "append_choices_to_input": False},
        {"name": "inline", "description": "sums", "examples": [{"input": "1+1", "target": "2"}], "output_prefix": "="},
        {"name": "docs", "description": "documents", "files": ["docs.txt"]},
    ]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    bb, named_by_file, inline, docs = read_task_spec(tmp_path / "spec.json")
    assert bb.name == "bb" and bb.description == task_json["description"] and bb.texts is None
    assert (bb.input_prefix, bb.output_prefix) == ("\nQuestion: ", "\nAnswer: ")
    assert [(e.input, e.target, e.choices) for e in bb.examples] == [
        ("What is 2 + 2?", "4", None),
        ("What is 3 + 3?", "6", None),
        ("Which is an animal?\n  choice: cat\n  choice: cloud\n  choice: stone", "cat", ["cat", "cloud", "stone"]),
    ]
    assert bb.prompt(bb.examples[0]) == "\nQuestion: What is 2 + 2?\nAnswer: "
    assert named_by_file.name == "toy_bigbench" and named_by_file.description == "overridden"
    assert named_by_file.examples[2].input == "Which is an animal?"  # choices not appended when asked not to
    assert (inline.input_prefix, inline.output_prefix) == ("\nQ: ", "=") and inline.examples[0].target == "2"
    assert docs.texts == ["a document"] and docs.examples is None


def test_collect_bank_on_text_and_example_tasks_loads_in_peft(model_and_tokenizer, tmp_path):
    base, tokenizer = model_and_tokenizer
    tasks = [
        TaskData("numbers", "lists of numbers", texts=CORPUS[:4]),
        TaskData("animals", "sentences about animals", texts=[" ".join(CORPUS[5:] * 8)]),
        TaskData("sums", "adding small numbers", examples=SUMS),
    ]
    args = CollectArguments(**{**ARGS, "steps": 6}, last_fraction=0.5, condition="in-context", num_examples=2)
    bank = collect_bank(base, tokenizer, tasks, args)
    assert bank.task_names == ["numbers", "animals", "sums"]
    assert bank.condition_encoder["kind"] == "hidden_state"
    assert all(bank.condition(task).shape == (16,) for task in bank.task_names)  # the base model's hidden size
    bank.save_pretrained(tmp_path / "bank")
    loaded = LoraBank.from_pretrained(tmp_path / "bank")
    assert len(loaded) == 9 and [c.step for c in loaded.checkpoints_of("sums")] == [4, 5, 6]
    model = get_peft_model(copy.deepcopy(base), args.lora_config())  # in place: never on the shared fixture
    for checkpoint in loaded:
        result = set_peft_model_state_dict(model, checkpoint.state_dict)
        assert result.unexpected_keys == []
        assert [key for key in result.missing_keys if "lora_" in key] == []
    finals = [loaded.checkpoints_of(task)[-1].state_dict for task in loaded.task_names]
    key = next(key for key in loaded.layout.keys if "lora_B" in key)
    assert not torch.equal(finals[0][key], finals[2][key])  # tasks trained apart from the same start


@pytest.mark.parametrize("name", ["../../x", "/abs/folder", "", "a/b", "a\\b", "..", ".", "nul\x00byte", "x" * 256])
def test_unsafe_task_names_are_refused_everywhere(name, tmp_path):
    with pytest.raises(InvalidConfigError):
        check_task_name(name)
    with pytest.raises(PeftCVAEError):
        TaskData(name, texts=["text"])
    (tmp_path / "spec.json").write_text(json.dumps([{"name": name, "examples": [{"input": "a", "target": "b"}]}]))
    with pytest.raises(PeftCVAEError):
        read_task_spec(tmp_path / "spec.json")


def test_add_checkpoint_refuses_unsafe_task_names(model_and_tokenizer):
    base, tokenizer = model_and_tokenizer
    task = TaskData("sums", examples=SUMS[:4])
    bank = train_task_lora(base, tokenizer, task, CollectArguments(**{**ARGS, "steps": 2})).bank
    state_dict = bank.checkpoints[0].state_dict
    for name in ["../../x", "/abs", ""]:
        with pytest.raises(InvalidConfigError, match="task name"):
            bank.add_checkpoint(name, state_dict)
    bank.add_checkpoint("Sums", state_dict)  # differs only by case: a different, valid task
    assert bank.task_names == ["sums", "Sums"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lora_r": -1}, "lora_r"),
        ({"last_fraction": 0}, "last_fraction"),
        ({"last_fraction": 1.5}, "last_fraction"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"save_steps": 0}, "save_steps"),
        ({"condition": "vibes"}, "condition must be one of"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_collect_arguments_are_checked(overrides, words):
    with pytest.raises(InvalidConfigError, match=words):
        CollectArguments(**overrides)


def test_collect_arguments_defaults():
    args = CollectArguments(recipe="sparse-tail", steps=120)
    assert args.checkpoint_every == 6 and CollectArguments(steps=10, recipe="sparse-tail").checkpoint_every == 1
    config = args.lora_config()
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (8, 16, ["q_proj", "v_proj"])


def test_text_condition_needs_descriptions(model_and_tokenizer):
    base, tokenizer = model_and_tokenizer
    with pytest.raises(InvalidConfigError, match="no 'description'"):
        collect_bank(base, tokenizer, [TaskData("sums", examples=SUMS)], CollectArguments(**ARGS))
    with pytest.raises(InvalidConfigError, match="more than once"):
        collect_bank(base, tokenizer, [TaskData("a", "d", texts=["x"])] * 2, CollectArguments(**ARGS))


# ---- the converged-tail recipe and the cost estimate ----------------------------------------------------------------
def test_converged_tail_recipe_keeps_every_step_of_the_last_40():
    args = CollectArguments(recipe="converged-tail", steps=120)
    assert (args.save_steps, args.checkpoint_every) == (1, 1)
    assert kept_steps(args.steps, args.checkpoint_every, args.last_fraction) == list(range(81, 121))
    short = CollectArguments(recipe="converged-tail")  # the default 60 steps
    assert kept_steps(short.steps, short.checkpoint_every, short.last_fraction) == list(range(21, 61))
    tiny = CollectArguments(recipe="converged-tail", steps=30)  # shorter than the tail: every step
    assert kept_steps(tiny.steps, tiny.checkpoint_every, tiny.last_fraction) == list(range(1, 31))
    explicit = CollectArguments(recipe="converged-tail", save_steps=4, last_fraction=0.5)  # flags given win
    assert (explicit.save_steps, explicit.last_fraction) == (4, 0.5)
    default = CollectArguments()  # converged-tail is the default recipe
    assert (default.recipe, default.save_steps, default.last_fraction) == ("converged-tail", 1, 40 / 60)
    assert (default.steps, default.batch_size, default.lr) == (60, 4, 1e-3)
    with pytest.raises(InvalidConfigError, match="recipe must be one of"):
        CollectArguments(recipe="fast")


def test_sparse_tail_recipe_keeps_the_old_defaults_and_explicit_values_win():
    sparse = CollectArguments(recipe="sparse-tail", steps=120)  # the default before: every 6th of the last third
    assert (sparse.save_steps, sparse.checkpoint_every, sparse.last_fraction) == (None, 6, 1 / 3)
    assert kept_steps(sparse.steps, sparse.checkpoint_every, sparse.last_fraction) == list(range(84, 121, 6))
    assert CollectArguments(recipe=None).recipe == "sparse-tail"  # a config file's null: no preset, as before
    # An explicit value wins even when it equals the other recipe's (1/3 is sparse-tail's last_fraction).
    third = CollectArguments(last_fraction=1 / 3)
    assert (third.save_steps, third.last_fraction) == (1, 1 / 3)
    assert kept_steps(60, third.checkpoint_every, third.last_fraction) == list(range(41, 61))  # not the last 40


def test_cost_estimate_is_exact_on_disk_and_kept_steps_match_training(model_and_tokenizer, tmp_path):
    base, tokenizer = model_and_tokenizer
    task = TaskData("numbers", "lists of numbers", texts=CORPUS[:4])
    args = CollectArguments(**{**ARGS, "save_steps": 3}, last_fraction=0.6)
    cost = estimate_collect_cost(base, tokenizer, [task, task], args, timed_steps=2)
    result = train_task_lora(base, tokenizer, task, args)
    assert cost.steps == result.steps == [6, 9, 12]  # every 3rd step of the last 60 % of 12 steps
    result.bank.save_pretrained(tmp_path / "bank")
    files = sorted((tmp_path / "bank" / "checkpoints").glob("*.safetensors"))
    assert len(files) == cost.checkpoints_per_task
    assert all(file.stat().st_size == cost.bytes_per_checkpoint for file in files)  # exact, header included
    assert cost.numbers_per_checkpoint == result.bank.layout.numel
    assert cost.bytes_per_checkpoint > cost.numbers_per_checkpoint * 4
    assert cost.seconds_per_step > 0 and cost.seconds_per_task == pytest.approx(cost.seconds_per_step * 12)
    text = cost.describe()
    assert "3 checkpoints kept (steps 6..12)" in text and "measured on 2 timed step(s) of task 'numbers'" in text
    assert "Total for 2 task(s)" in text
    assert estimate_collect_cost(base, tokenizer, [task], args, timed_steps=0).seconds_per_task is None


def test_held_out_perplexity_is_reported_before_and_after(model_and_tokenizer):
    from peft_cvae.evaluation import evaluate_language_model

    base, tokenizer = model_and_tokenizer
    held_out = CORPUS[:1]  # a training text, so that a dozen steps surely lower its perplexity
    task = TaskData("numbers", "lists of numbers", texts=CORPUS[:4], test_texts=["", *held_out])
    assert task.test_texts == held_out  # empty texts dropped
    args = CollectArguments(**ARGS)
    result = train_task_lora(base, tokenizer, task, args)
    before, after = result.held_out_perplexity
    reference = evaluate_language_model(base, tokenizer, held_out, max_length=args.max_length, progress=False)
    assert before == pytest.approx(reference["perplexity"], rel=1e-5)  # LoRA B starts at 0: the base model
    assert after < 0.95 * before
    assert train_task_lora(base, tokenizer, TaskData("n", texts=CORPUS[:4]), args).held_out_perplexity is None
    with pytest.raises(InvalidConfigError, match="all of them are empty"):
        TaskData("n", texts=CORPUS[:4], test_texts=[" "])


def test_spec_test_files_and_test_split(tmp_path):
    (tmp_path / "train.txt").write_text("some training text")
    (tmp_path / "test.txt").write_text("held-out text\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "a row"}\n')
    entry = {"name": "t", "description": "d", "files": ["train.txt"], "test_files": ["test.txt"]}
    (tmp_path / "spec.json").write_text(json.dumps([entry]))
    assert read_task_spec(tmp_path / "spec.json")[0].test_texts == ["held-out text"]
    dataset = {"name": "t", "dataset": "json", "data_files": "rows.jsonl", "test_split": "train"}
    (tmp_path / "spec.json").write_text(json.dumps([dataset]))
    assert read_task_spec(tmp_path / "spec.json")[0].test_texts == ["a row"]
    for bad, words in [
        ({**entry, "test_split": "test"}, "both 'test_files' and 'test_split'"),
        ({**entry, "test_files": "test.txt"}, "non-empty list of paths"),
        ({k: v for k, v in entry.items() if k != "test_files"} | {"test_split": "test"}, "has none; use 'test_files'"),
    ]:
        (tmp_path / "spec.json").write_text(json.dumps([bad]))
        with pytest.raises(InvalidConfigError, match=words):
            read_task_spec(tmp_path / "spec.json")


def test_every_task_starts_from_the_start_adapter_and_a_mismatched_one_is_refused(model_and_tokenizer, tmp_path):
    base, tokenizer = model_and_tokenizer
    task = TaskData("sums", "adding small numbers", examples=SUMS)
    first = train_task_lora(base, tokenizer, task, CollectArguments(**{**ARGS, "steps": 20}))
    first.model.save_pretrained(tmp_path / "start")
    start = {key: value.clone() for key, value in first.bank.checkpoints[-1].state_dict.items()}
    # lr tiny: after one step every checkpoint must still be the start, not the shared random initialisation
    args = CollectArguments(
        **{**ARGS, "steps": 2, "lr": 1e-9},
        last_fraction=1.0,
        condition="in-context",
        start_adapter=str(tmp_path / "start"),
    )
    bank = collect_bank(base, tokenizer, [task, TaskData("more", "more sums", examples=SUMS[::-1])], args)
    for checkpoint in bank.checkpoints:
        for key, value in checkpoint.state_dict.items():
            torch.testing.assert_close(value, start[key], rtol=0, atol=1e-6)
    fresh = train_task_lora(base, tokenizer, task, dataclasses.replace(args, start_adapter=None))
    key = next(key for key in start if "lora_B" in key)
    assert fresh.bank.checkpoints[-1].state_dict[key].abs().max() < 1e-6  # B starts at zero without a start
    assert answer_nll(bank_model(base, args, bank), tokenizer, task) < 0.8 * answer_nll(base, tokenizer, task)

    for change, words in (({"lora_r": 4}, "r=2 (this run: 4)"), ({"lora_alpha": 1.0}, "lora_alpha=4")):
        wrong = CollectArguments(**{**ARGS, **change}, start_adapter=str(tmp_path / "start"))
        with pytest.raises(InvalidConfigError, match=re.escape(words)):
            collect_bank(base, tokenizer, [task], wrong)
    with pytest.raises(InvalidConfigError, match="target_modules"):
        collect_bank(
            base,
            tokenizer,
            [task],
            CollectArguments(**ARGS, target_modules=["q_proj"], start_adapter=str(tmp_path / "start")),
        )


def bank_model(base, args, bank):
    model = get_peft_model(copy.deepcopy(base), args.lora_config())
    set_peft_model_state_dict(model, bank.checkpoints[-1].state_dict)
    return model.eval()


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_from_resume_dir_to_the_same_lora(model_and_tokenizer, tmp_path, monkeypatch):
    from peft_cvae import collect

    base, tokenizer = model_and_tokenizer
    task = TaskData("sums", "adding small numbers", examples=SUMS)
    args = CollectArguments(**{**ARGS, "steps": 12}, last_fraction=0.25)  # kept tail: steps 10-12
    whole = train_task_lora(base, tokenizer, task, args, resume_dir=tmp_path / "whole", resume_every=4)
    assert sorted(path.name for path in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-8"]  # newest only

    original = collect._ResumableCheckpoints.on_step_end

    def kill_at_step_6(self, arguments, state, control, **kwargs):
        if state.global_step == 6:
            raise _Killed
        return original(self, arguments, state, control, **kwargs)

    monkeypatch.setattr(collect._ResumableCheckpoints, "on_step_end", kill_at_step_6)
    with pytest.raises(_Killed):
        train_task_lora(base, tokenizer, task, args, resume_dir=tmp_path / "killed", resume_every=4)
    assert sorted(path.name for path in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-4"]
    monkeypatch.setattr(collect._ResumableCheckpoints, "on_step_end", original)
    resumed = train_task_lora(base, tokenizer, task, args, resume_dir=tmp_path / "killed", resume_every=4)

    assert resumed.resumed_from == 4 and whole.resumed_from is None  # it continued, it did not start again
    assert resumed.steps == whole.steps == [10, 11, 12]
    for mine, theirs in zip(resumed.bank.checkpoints, whole.bank.checkpoints, strict=True):
        for key, value in mine.state_dict.items():
            torch.testing.assert_close(value, theirs.state_dict[key], rtol=1e-5, atol=1e-6)
    fresh = train_task_lora(base, tokenizer, task, args)  # no resume_dir: nothing written, the same LoRA
    key = next(iter(fresh.bank.checkpoints[-1].state_dict))
    torch.testing.assert_close(fresh.bank.checkpoints[-1].state_dict[key], whole.bank.checkpoints[-1].state_dict[key])
