"""The `peft-cvae` command line end to end on tiny models: collect -> train -> generate -> evaluate -> info -> plot.

Everything runs in-process through `main([...])`, on a 2-layer Llama with a byte-level BPE tokenizer and a 1-layer BERT
sentence encoder, both saved to folders as a user's models would be.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from peft_cvae import LoraBank, PeftCVAEGenerator, merge_adapters
from peft_cvae.cli import main
from peft_cvae.testing_utils import tiny_bert, tiny_bpe_tokenizer, tiny_llama, tiny_llama_for

COMMANDS = ["collect", "train", "generate", "merge", "evaluate", "info", "plot"]
TASK_TEXTS = {  # three easily told apart "domains"
    "numbers": lambda i: " ".join(str((i * 7 + k) % 100) for k in range(40)),
    "letters": lambda i: " ".join(chr(97 + (i + k) % 26) * 3 for k in range(40)),
    "animals": lambda i: " ".join(
        ["the cat sat on the mat", "a dog ran in the park", "birds sing"][(i + k) % 3] for k in range(8)
    ),
}
DESCRIPTIONS = {"numbers": "lists of numbers", "letters": "repeated letters", "animals": "sentences about animals"}
TRAIN_FLAGS = ["--epochs", "100", "--lr", "5e-3", "--batch-size", "4", "--patch-size", "16", "--hidden-channels", "32"]
TRAIN_FLAGS += ["--latent-size", "4", "--num-layers", "1", "--early-stopping-patience", "0"]  # all 100 epochs
LORA_FLAGS = [
    "--steps",
    "20",
    "--batch-size",
    "2",
    "--max-length",
    "16",
    "--save-steps",
    "1",
    "--last-fraction",
    "0.15",
]
LORA_FLAGS += ["--lora-r", "2", "--lr", "3e-2"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with a few merges, trained in milliseconds."""
    return tiny_bpe_tokenizer([make(i) for make in TASK_TEXTS.values() for i in range(4)])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Base model, sentence encoder, task texts and spec files in folders; then one collect and one train run."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer()
    # larger random logits, so that a few LoRA steps visibly change them
    base = tiny_llama_for(tokenizer, initializer_range=0.3)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    encoder = tiny_bert(len(tokenizer))
    encoder.save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")

    for task, make in TASK_TEXTS.items():
        (root / "data" / task).mkdir(parents=True)
        for i in range(4):
            (root / "data" / task / f"{i}.txt").write_text(make(i) + "\n")
        (root / "held_out" / task).mkdir(parents=True)
        (root / "held_out" / task / "test.txt").write_text(make(10) + "\n")
        rows = [json.dumps({"text": make(i), "id": i}) for i in range(4)]
        (root / "data" / f"{task}.jsonl").write_text("\n".join(rows) + "\n")
    spec = [{"name": task, "description": DESCRIPTIONS[task], "files": [f"data/{task}/*.txt"]} for task in TASK_TEXTS]
    (root / "spec.json").write_text(json.dumps(spec))
    dataset_spec = [
        {"name": task, "dataset": "json", "data_files": f"data/{task}.jsonl", "text_column": "text"}
        for task in TASK_TEXTS
    ]
    (root / "dataset_spec.json").write_text(json.dumps(dataset_spec))

    paths = {name: root / name for name in ("base", "encoder", "bank", "generator", "loras", "spec.json")}
    paths["root"] = root
    args = ["collect", "--spec", str(paths["spec.json"]), "--base-model", str(paths["base"])]
    args += ["--output", str(paths["bank"]), "--text-encoder", str(paths["encoder"])]
    args += ["--save-adapters", str(paths["loras"]), *LORA_FLAGS]
    assert main(args) == 0
    assert main(["train", str(paths["bank"]), "--output", str(paths["generator"]), *TRAIN_FLAGS]) == 0
    return paths


def load_checked(base_dir, adapter_dir) -> PeftModel:
    """Load an adapter into the base model and assert that every key matched."""
    base = LlamaForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="first")
    result = model.load_adapter(str(adapter_dir), adapter_name="checked")
    assert result.unexpected_keys == []
    assert [key for key in result.missing_keys if "lora_" in key] == []
    return model


def test_collect_writes_a_bank_of_real_checkpoints(workspace):
    bank = LoraBank.from_pretrained(workspace["bank"])
    assert bank.task_names == list(TASK_TEXTS)
    for task in TASK_TEXTS:
        steps = [checkpoint.step for checkpoint in bank.checkpoints_of(task)]
        assert steps == [18, 19, 20]  # every step of the last 15 % of 20 steps
        assert bank.description(task) == DESCRIPTIONS[task]
        assert bank.condition(task).shape == (16,)  # the tiny BERT's hidden size
    assert bank.condition_encoder["kind"] == "text"
    assert bank.condition_encoder["name_or_path"] == str(workspace["encoder"].resolve())
    # Training moved the LoRAs: B starts at zero and differs per task afterwards.
    finals = {task: bank.checkpoints_of(task)[-1].state_dict for task in TASK_TEXTS}
    key = next(key for key in bank.layout.keys if "lora_B" in key)
    assert finals["numbers"][key].abs().sum() > 0
    assert not torch.equal(finals["numbers"][key], finals["letters"][key])
    # The final LoRA of each task was also saved as a PEFT adapter, equal to the bank's last checkpoint.
    saved = load_file(workspace["loras"] / "numbers" / "adapter_model.safetensors")
    assert set(saved) == set(bank.layout.keys)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, finals["numbers"][name])


def test_train_writes_a_generator_whose_loss_fell(workspace):
    generator = PeftCVAEGenerator.from_pretrained(workspace["generator"])
    assert generator.config.task_names == list(TASK_TEXTS)
    assert generator.config.condition_encoder["kind"] == "text"
    record = json.loads((workspace["generator"] / "training_history.json").read_text())
    history = record["history"]
    assert len(history) == 100
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_generate_by_task_name_matches_the_library(workspace, tmp_path):
    out = tmp_path / "numbers-adapter"
    assert (
        main(["generate", str(workspace["generator"]), "--task", "numbers", "--seed", "3", "--output", str(out)]) == 0
    )
    model = load_checked(workspace["base"], out)
    generator = PeftCVAEGenerator.from_pretrained(workspace["generator"]).eval()
    expected = generator.generate_adapter("numbers", seed=3).state_dict
    written = load_file(out / "adapter_model.safetensors")
    assert set(written) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor)
    assert model.active_adapter == "first"


def test_generate_from_a_hub_repo_id(workspace, tmp_path, hub_env):
    generator = PeftCVAEGenerator.from_pretrained(workspace["generator"])
    generator.push_to_hub("cli-user/cli-generator")
    out = tmp_path / "from-hub"
    assert main(["generate", "cli-user/cli-generator", "--task", "numbers", "--seed", "3", "--output", str(out)]) == 0
    expected = generator.eval().generate_adapter("numbers", seed=3).state_dict
    written = load_file(out / "adapter_model.safetensors")
    assert set(written) == set(expected)
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())


def test_generate_from_a_missing_repo_is_one_line(workspace, tmp_path, hub_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "cli-user/no-such-generator", "--task", "numbers", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no-such-generator" in error
    assert not (tmp_path / "x").exists()


def test_generate_from_a_description_and_several_samples(workspace, tmp_path):
    out = tmp_path / "described"
    args = ["generate", str(workspace["generator"]), "--description", "numbers in a list", "--output", str(out)]
    assert main([*args, "--num-samples", "2", "--temperature", "0.5"]) == 0
    first = load_file(out / "sample-00" / "adapter_model.safetensors")
    second = load_file(out / "sample-01" / "adapter_model.safetensors")
    assert any(not torch.equal(first[key], second[key]) for key in first)  # two different draws
    load_checked(workspace["base"], out / "sample-01")


def test_evaluate_prints_base_and_adapter_numbers(workspace, tmp_path, capsys):
    generated = tmp_path / "generated"
    assert (
        main(
            [
                "generate",
                str(workspace["generator"]),
                "--task",
                "numbers",
                "--temperature",
                "0",
                "--output",
                str(generated),
            ]
        )
        == 0
    )
    capsys.readouterr()
    results_file = tmp_path / "results.json"
    args = [
        "evaluate",
        "--base-model",
        str(workspace["base"]),
        "--texts",
        str(workspace["root"] / "held_out" / "numbers"),
    ]
    args += ["--adapter", f"original={workspace['loras'] / 'numbers'}", "--adapter", f"generated={generated}"]
    args += ["--max-length", "32", "--json", str(results_file)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(table) == {"base", "original", "generated"}
    results = json.loads(results_file.read_text())["results"]
    for name, row in table.items():
        assert float(row[1]) == pytest.approx(results[name]["perplexity"], rel=1e-3)
        assert float(row[2]) == pytest.approx(results[name]["bits_per_character"], rel=1e-3)
        assert results[name]["num_tokens"] > 10
    # 20 steps of LoRA training on this domain lowered the perplexity of its held-out text.
    assert results["original"]["perplexity"] < results["base"]["perplexity"]
    assert results["original"]["perplexity"] != results["generated"]["perplexity"]


def test_info_describes_bank_generator_and_adapter(workspace, capsys):
    assert main(["info", str(workspace["bank"])]) == 0
    out = capsys.readouterr().out
    assert "LoRA bank" in out and "checkpoints:     9" in out and "numbers: 3 checkpoints" in out
    assert '"kind": "text"' in out and "r=2" in out
    assert main(["info", str(workspace["generator"])]) == 0
    out = capsys.readouterr().out
    assert "generator" in out and "tasks:           3" in out and "100 epochs" in out and "condition size:  16" in out
    assert main(["info", str(workspace["loras"] / "letters")]) == 0
    assert "PEFT adapter" in capsys.readouterr().out


def test_info_on_a_bank_reads_no_checkpoint(workspace, tmp_path, capsys, monkeypatch):
    import shutil

    from peft_cvae.data import LoraBank as Bank

    def refuse(*args, **kwargs):
        raise AssertionError("info loaded the whole bank")

    monkeypatch.setattr(Bank, "from_pretrained", refuse)
    bank = tmp_path / "bank"
    shutil.copytree(workspace["bank"], bank)
    assert main(["info", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints:     9\n" in out and "conditions:      3 of 3 tasks, size 16" in out
    assert "letters: 3 checkpoints (steps [18, 19, 20]) - repeated letters" in out
    next(bank.glob("checkpoints/*.safetensors")).unlink()
    assert main(["info", str(bank)]) == 0
    assert "(1 listed but missing, e.g. checkpoints/" in capsys.readouterr().out
    # a bank of a newer format is refused as loading refuses it, not described from fields it may have renamed
    manifest = json.loads((bank / "bank.json").read_text())
    (bank / "bank.json").write_text(json.dumps({**manifest, "format_version": 999}))
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(bank)])
    assert exit_info.value.code == 2 and "newer than this peft-cvae understands" in capsys.readouterr().err


def test_plot_writes_pngs(workspace, tmp_path):
    assert main(["plot", str(workspace["bank"]), "--output", str(tmp_path / "bank"), "--method", "tsne"]) == 0
    assert main(["plot", str(workspace["generator"]), "--output", str(tmp_path / "gen"), "--samples", "3"]) == 0
    with_bank = ["--bank", str(workspace["bank"]), "--method", "pca"]
    assert main(["plot", str(workspace["generator"]), "--output", str(tmp_path / "real"), *with_bank]) == 0
    assert (tmp_path / "real" / "generated.png").read_bytes()[:4] == b"\x89PNG"
    for path in [tmp_path / "bank" / "checkpoints.png", tmp_path / "bank" / "task_vectors.png"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    for path in [tmp_path / "gen" / "training_loss.png", tmp_path / "gen" / "generated.png"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_in_context_conditions_from_a_dataset_spec(workspace, tmp_path):
    """--condition in-context (base-model hidden states, ICM-LoRA Eq. 1) with tasks read through `datasets`."""
    bank_dir, generator_dir, out = tmp_path / "bank", tmp_path / "generator", tmp_path / "adapter"
    args = ["collect", "--spec", str(workspace["root"] / "dataset_spec.json"), "--base-model", str(workspace["base"])]
    args += ["--output", str(bank_dir), "--condition", "in-context", "--num-examples", "2", *LORA_FLAGS]
    args += ["--steps", "8", "--last-fraction", "0.5", "--bf16"]  # fewer steps here; bf16 autocast on the CPU
    assert main(args) == 0
    bank = LoraBank.from_pretrained(bank_dir)
    assert bank.condition_encoder["kind"] == "hidden_state"
    assert bank.condition("numbers").shape == (16,)  # the base model's hidden size
    assert main(["train", str(bank_dir), "--output", str(generator_dir), *TRAIN_FLAGS]) == 0
    examples = tmp_path / "examples.txt"
    examples.write_text(TASK_TEXTS["letters"](20) + "\n" + TASK_TEXTS["letters"](21) + "\n")
    assert main(["generate", str(generator_dir), "--examples", str(examples), "--output", str(out)]) == 0
    load_checked(workspace["base"], out)
    # A description cannot be encoded for a generator trained on in-context vectors: one clear line, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(generator_dir), "--description", "letters", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: peft-cvae")
    assert len(out.splitlines()) > 5


def user_mistake(argv, capsys) -> str:
    """Run a command that must fail as a user mistake; return its one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # One line of its own (transformers may draw a progress bar for loading weights before it).
    lines = [line for line in err.splitlines() if line.startswith("peft-cvae ")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def test_user_mistakes_exit_2_with_one_line(workspace, tmp_path, capsys):
    base = str(workspace["base"])
    err = user_mistake(
        ["collect", "--spec", str(tmp_path / "nope.json"), "--base-model", base, "--output", "x"], capsys
    )
    assert "does not exist" in err and "nope.json" in err
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(json.dumps([{"name": "a", "description": "d"}]))
    err = user_mistake(["collect", "--spec", str(bad_spec), "--base-model", base, "--output", "x"], capsys)
    assert "exactly one of 'files'" in err
    bad_spec.write_text("[{")
    assert "not valid JSON" in user_mistake(
        ["collect", "--spec", str(bad_spec), "--base-model", base, "--output", "x"], capsys
    )
    err = user_mistake(
        ["generate", str(workspace["generator"]), "--task", "poetry", "--output", str(tmp_path / "a")], capsys
    )
    assert "Unknown task 'poetry'" in err and "numbers" in err
    err = user_mistake(["train", str(tmp_path), "--output", str(tmp_path / "g")], capsys)
    assert "bank.json" in err
    assert "not a LoRA bank" in user_mistake(["info", str(tmp_path)], capsys)
    # An adapter of another base model (hidden size 32, not 16) is refused, not silently half-loaded.
    other = tiny_llama(hidden_size=32)
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    texts = str(workspace["root"] / "held_out" / "numbers")
    err = user_mistake(
        ["evaluate", "--base-model", base, "--texts", texts, "--adapter", f"x={tmp_path / 'other'}"], capsys
    )
    assert "does not fit the base model" in err
    # argparse's own mistakes also exit 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(workspace["generator"]), "--output", "x"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("name", ["../../x", "/abs/folder"])
def test_collect_refuses_task_names_that_leave_the_adapter_folder(name, workspace, tmp_path, capsys):
    """Issue 15.1: `--save-adapters FOLDER` with task "../../x" wrote outside FOLDER (exit 0); now nothing, exit 2."""
    work = tmp_path / "a" / "b"
    (work / "data").mkdir(parents=True)
    (work / "data" / "0.txt").write_text(TASK_TEXTS["numbers"](0))
    spec = work / "spec.json"
    spec.write_text(json.dumps([{"name": name, "description": "numbers", "files": ["data/*.txt"]}]))
    before = sorted(tmp_path.rglob("*"))
    args = ["collect", "--spec", str(spec), "--base-model", str(workspace["base"]), "--output", str(work / "bank")]
    args += ["--save-adapters", str(work / "adapters"), "--text-encoder", str(workspace["encoder"]), *LORA_FLAGS]
    err = user_mistake(args, capsys)
    assert "task name" in err and "path" in err
    assert sorted(tmp_path.rglob("*")) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()


def test_train_reads_a_yaml_config_and_the_command_line_wins(workspace, tmp_path):
    config = tmp_path / "train.yaml"
    sizes = "patch_size: 16\nhidden-channels: 32\nlatent_size: 4\nnum_layers: 1\ntask_memory: false\n"
    config.write_text(f"epochs: 5\nlr: 5e-3\nbatch_size: 4\noutput: {tmp_path / 'generator'}\n{sizes}")
    assert main(["train", str(workspace["bank"]), "--config", str(config), "--epochs", "2"]) == 0
    record = json.loads((tmp_path / "generator" / "training_history.json").read_text())
    assert len(record["history"]) == 2  # --epochs on the command line beat the file's 5
    assert (record["run"]["lr"], record["run"]["batch_size"]) == (5e-3, 4)  # YAML reads 5e-3 as a string: converted
    config = PeftCVAEGenerator.from_pretrained(tmp_path / "generator").config
    assert (config.hidden_channels, config.patch_size, config.task_memory) == (32, 16, False)


def test_train_defaults_to_task_memory_and_no_task_memory_turns_it_off(workspace, tmp_path):
    assert PeftCVAEGenerator.from_pretrained(workspace["generator"]).config.task_memory is True  # no flag given
    sizes = ["--patch-size", "16", "--hidden-channels", "8", "--latent-size", "4", "--num-layers", "1"]
    assert main(["train", str(workspace["bank"]), "--output", str(tmp_path / "g"), "--epochs", "1", *sizes,
                 "--no-task-memory"]) == 0  # fmt: skip
    plain = PeftCVAEGenerator.from_pretrained(tmp_path / "g")
    assert plain.config.task_memory is False and plain.task_memory is None


def test_collect_reads_a_json_config(workspace, tmp_path):
    values = {"spec": str(workspace["spec.json"]), "base_model": str(workspace["base"]), "output": str(tmp_path / "b")}
    values.update({"text_encoder": str(workspace["encoder"]), "steps": 4, "lora_r": 2, "max_length": 16})
    values.update({"batch_size": 2, "save_steps": 1, "last_fraction": 0.5})
    (tmp_path / "collect.json").write_text(json.dumps(values))
    assert main(["collect", "--config", str(tmp_path / "collect.json")]) == 0
    bank = LoraBank.from_pretrained(tmp_path / "b")
    assert [checkpoint.step for checkpoint in bank.checkpoints_of("letters")] == [3, 4]
    assert bank.layout.lora_config["r"] == 2


def test_collect_prints_its_cost_first_and_estimate_only_trains_nothing(workspace, tmp_path, capsys):
    args = ["collect", "--spec", str(workspace["spec.json"]), "--base-model", str(workspace["base"])]
    args += ["--output", str(tmp_path / "b"), "--text-encoder", str(workspace["encoder"]), "--lora-r", "2"]
    args += ["--max-length", "16", "--batch-size", "2", "--recipe", "converged-tail", "--estimate-only"]
    assert main([*args, "--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "recipe converged-tail" in out
    assert "40 checkpoints kept (steps 11..50)" in out  # the recipe: every step of the last 40
    assert "measured on 2 timed step(s) of task 'numbers'" in out and "Total for 3 task(s)" in out
    assert not (tmp_path / "b").exists()
    assert main([*args, "--steps", "50", "--save-steps", "10"]) == 0  # an explicit flag beats the recipe
    assert "4 checkpoints kept (steps 20..50)" in capsys.readouterr().out
    default = [arg for arg in args if arg not in ("--recipe", "converged-tail")]
    assert main([*default, "--steps", "50"]) == 0  # converged-tail is the default
    out = capsys.readouterr().out
    assert "recipe converged-tail" in out and "40 checkpoints kept (steps 11..50)" in out
    assert main([*default, "--steps", "50", "--recipe", "sparse-tail"]) == 0  # the lighter preset
    assert "8 checkpoints kept (steps 36..50)" in capsys.readouterr().out  # every 2nd step of the last third


def test_collect_summary_gives_held_out_perplexity_and_one_bar_per_task(workspace, tmp_path, capsys):
    import re

    root = workspace["root"]
    spec = [{"name": "numbers", "description": "lists of numbers", "files": [str(root / "data" / "numbers")]}]
    spec[0]["test_files"] = [str(root / "data" / "numbers" / "0.txt")]  # a training text: its perplexity must fall
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["collect", "--spec", str(tmp_path / "spec.json"), "--base-model", str(workspace["base"])]
    args += ["--output", str(tmp_path / "b"), "--text-encoder", str(workspace["encoder"]), *LORA_FLAGS]
    assert main(args) == 0
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if line.startswith("  numbers:"))
    assert "loss" in line and "(mean of the last 10% of steps)" in line
    before, after = map(float, re.search(r"held-out perplexity ([\d.]+) -> ([\d.]+)", line).groups())
    assert after < before
    assert "Warning" not in captured.err and "Loading weights" not in captured.err + captured.out
    assert "[1/1] numbers" in captured.err  # the task's own progress bar


def test_config_file_mistakes_exit_2_with_one_line(workspace, tmp_path, capsys):
    bank = str(workspace["bank"])
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    err = user_mistake(
        ["train", bank, "--output", str(tmp_path / "g"), "--config", str(tmp_path / "typo.yaml")], capsys
    )
    assert "'epochz'" in err and "not an option of `peft-cvae train`" in err and "epochs" in err
    err = user_mistake(["train", bank, "--config", str(tmp_path / "missing.yaml")], capsys)
    assert "does not exist" in err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "mapping" in user_mistake(["train", bank, "--config", str(tmp_path / "list.json")], capsys)
    assert not (tmp_path / "g").exists()


def test_dashed_and_underscored_flags_are_the_same():
    from peft_cvae.commands import build_parser

    dashed = ["train", "b", "--batch-size", "3", "--task-memory", "--output", "o", "--resume", "latest"]
    underscored = ["train", "b", "--batch_size", "3", "--task_memory", "--output_dir", "o", "--resume_from", "latest"]
    assert vars(build_parser().parse_args(dashed)) == vars(build_parser().parse_args(underscored))
    parsed = build_parser().parse_args(dashed)
    assert (parsed.batch_size, parsed.task_memory, parsed.output_dir, parsed.resume_from) == (3, True, "o", "latest")


def test_out_of_range_numbers_exit_2_with_one_line(workspace, tmp_path, capsys):
    base, spec = str(workspace["base"]), str(workspace["spec.json"])
    err = user_mistake(
        ["collect", "--spec", spec, "--base-model", base, "--output", "x", "--last-fraction", "2"], capsys
    )
    assert "last_fraction must be in (0, 1]" in err
    err = user_mistake(["train", str(workspace["bank"]), "--output", str(tmp_path / "g"), "--epochs", "0"], capsys)
    assert "epochs must be a positive integer" in err
    assert not (tmp_path / "g").exists()


def test_evaluate_caches_the_base_score_and_compares_to_the_first_adapter(workspace, tmp_path, capsys, monkeypatch):
    import peft_cvae.evaluation

    original = str(workspace["loras"] / "numbers")
    args = [
        "evaluate",
        "--base-model",
        str(workspace["base"]),
        "--texts",
        str(workspace["root"] / "held_out" / "numbers"),
    ]
    args += ["--adapter", f"original={original}", f"again={original}", "--max-length", "32"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "first.json")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-4:] == ["vs", "original", "gain", "recovered"]
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert table["original"][-2:] == ["1.000x", "100%"] and table["again"][-2:] == ["1.000x", "100%"]
    assert table["base"][-1] == "0%" and float(table["base"][-2][:-1]) > 1  # the LoRA lowered the perplexity
    assert len(list((tmp_path / "cache").glob("base-*.json"))) == 1

    scored = []
    real = peft_cvae.evaluation.evaluate_language_model
    monkeypatch.setattr(
        peft_cvae.evaluation, "evaluate_language_model", lambda *a, **k: scored.append(k) or real(*a, **k)
    )
    assert main([*args[:-1], str(tmp_path / "second.json")]) == 0
    assert len(scored) == 2  # the two adapters; the base model's score came from the cache
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert first["results"] == second["results"]
    assert second["relative_to_first"]["again"] == {"perplexity_vs_first": 1.0, "gain_recovered": 1.0}


def test_generate_reports_nearest_tasks_and_info_says_where_the_adapter_came_from(workspace, tmp_path, capsys):
    adapter = tmp_path / "described"
    argv = ["generate", str(workspace["generator"]), "--description", "sentences about pets", "--output", str(adapter)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # The workspace's generator has task memory (train's default): each task's share of the adapter is listed too.
    assert "Nearest training tasks (cosine similarity, task-memory weight):" in out
    listed = [line.split(":")[0].strip() for line in out.splitlines() if "similarity " in line]
    assert sorted(listed) == sorted(TASK_TEXTS)  # all three tasks, best first
    weights = [float(line.rsplit("weight ", 1)[1]) for line in out.splitlines() if "similarity " in line]
    assert abs(sum(weights) - 1) < 2e-3  # the softmax over the bank tasks
    assert (adapter / "README.md").is_file()
    assert main(["info", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "generated by peft-cvae" in out and str(workspace["generator"]) in out
    assert "description 'sentences about pets'" in out and "seed 0, temperature 1.0" in out
    assert main(["info", str(workspace["loras"] / "letters")]) == 0
    assert "not generated by peft-cvae" in capsys.readouterr().out


def test_merge_writes_loadable_soup_ties_and_nearest_adapters(workspace, tmp_path, capsys):
    bank = str(workspace["bank"])
    for method in ("soup", "ties"):
        assert main(["merge", bank, "--method", method, "--output", str(tmp_path / method)]) == 0
        assert f"Wrote a {method} of 3 adapter(s)" in capsys.readouterr().out
        load_checked(workspace["base"], tmp_path / method)
    soup = load_file(tmp_path / "soup" / "adapter_model.safetensors")
    loaded = LoraBank.from_pretrained(workspace["bank"])
    reference = merge_adapters(loaded, "soup", base_model=LlamaForCausalLM.from_pretrained(workspace["base"]))
    for key, tensor in reference.state_dict.items():
        torch.testing.assert_close(soup[key], tensor)
    argv = ["merge", bank, "--method", "nearest", "--description", "lists of numbers", "--output", str(tmp_path / "n")]
    assert main(argv) == 0
    assert "Nearest bank task: numbers (cosine similarity 1.000)" in capsys.readouterr().out
    load_checked(workspace["base"], tmp_path / "n")


def test_merge_with_a_bad_method_exits_2_with_one_line(workspace, tmp_path, capsys):
    line = user_mistake(
        ["merge", str(workspace["bank"]), "--method", "average", "--output", str(tmp_path / "x")], capsys
    )
    assert "--method must be one of soup, linear" in line and "'average'" in line
    assert not (tmp_path / "x").exists()
