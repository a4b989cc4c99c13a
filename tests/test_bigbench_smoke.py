"""The BIG-bench zero-shot benchmark on its `tiny` preset (tiny models, synthetic task.json files), and its rules.

The tiny run goes through every step of the real one: selection rules on task.json files, the family split, LoRAs
through `peft_cvae.collect.train_task_lora`, description and in-context conditions, both generators, every control,
scoring, statistics, plots and the report; a rerun must come entirely from the cache.
"""

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from benchmarks import bigbench_zero_shot as benchmark
from benchmarks.bigbench import report
from benchmarks.bigbench.pipeline import CONDITION_KINDS, combined_conditions
from benchmarks.bigbench.selection import (
    SelectionRules,
    candidate_tasks,
    check_task,
    convert_example,
    family_of,
    is_english,
    select_and_split,
    task_format,
)
from benchmarks.bigbench.tiny import tiny_tokenizer, write_tiny_tasks


def test_tiny_preset_runs_every_control_and_a_rerun_comes_from_the_cache(tmp_path):
    arguments = ["--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    results = benchmark.main(arguments)

    saved = json.loads((tmp_path / "out" / "bigbench_zero_shot_tiny.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    split = saved["split"]
    assert split["heldout_families"] and not set(split["heldout_families"]) & set(split["train_families"])
    families = {name: info["family"] for name, info in saved["tasks"].items()}
    heldout = set(saved["heldout"])
    assert heldout and all(families[name] in split["heldout_families"] for name in heldout)
    assert "foreign.words" not in saved["tasks"] and "short.few" not in saved["tasks"]  # the rules refused them

    expected = set(benchmark.CONTROLS)  # retrieval by description and by in-context vectors included
    expected |= {*report.SHARED_START, report.MATCHED_MULTITASK, report.FUNCTIONAL_MULTITASK}
    labels = [f"generated ({variant}) from {kind}" for variant in report.VARIANT_ORDER for kind in CONDITION_KINDS]
    labels.append("generated (task memory) from description + examples")  # the tiny preset's combined condition
    for label in labels:
        expected |= {label, f"{label}, shuffled", f"{label}, random string"}
    for task, scores in saved["heldout"].items():
        assert set(scores) == expected
        assert all(math.isfinite(score["answer_nll"]) and score["answer_nll"] > 0 for score in scores.values())
        assert scores["oracle"]["answer_nll"] < scores["base"]["answer_nll"]  # the task's own LoRA learned
        picks = saved["retrieval"][task]
        # retrieval, by description or by examples, only ever returns bank tasks
        assert picks["nearest"] not in heldout and picks["nearest_by_examples"] not in heldout
        assert not set(picks["top_k_by_examples"]) & heldout
        assert sum(picks["top_k_by_examples"].values()) == pytest.approx(1.0)
        if picks["nearest_by_examples"] == picks["nearest"]:  # one bank task's mean: the same scores
            assert scores["nearest by examples"]["example_nll"] == scores["nearest description"]["example_nll"]
    summary = saved["summary"]
    assert summary["best_control"] in report.BASELINES
    # every generated design is checked against issue 13's targets, a variant name with ", " in it too
    assert {label for label in labels if label.startswith("generated")} <= set(summary["targets"])
    assert summary["controls"]["oracle"]["recovered_of_average"] == pytest.approx(1.0)
    assert summary["controls"]["base"]["recovered_of_average"] == pytest.approx(0.0, abs=1e-9)
    mean, low, high = summary["controls"]["base"]["answer_nll"]
    assert low <= mean <= high
    assert set(summary["wins"]["generated (task memory) from description"]) >= {"oracle", "nearest description"}
    assert saved["seen"] and all("own LoRA (final)" in scores for scores in saved["seen"].values())
    assert all(math.isfinite(entry["final_loss"]) for entry in saved["generators"].values())
    assert (
        saved["generators"]["plain / description"]["final_loss"]
        < saved["generators"]["plain / description"]["first_loss"]
    )
    functional = saved["generators"]["task memory + holdout 0.5 + functional / description"]
    assert functional["continues"] == "task memory + holdout 0.5"
    # the shared-start bank: LoRAs that start from the multi-task LoRA, not from the random initialisation
    for scores in saved["heldout"].values():
        assert scores["shared start: mean"]["answer_nll"] != scores["mean of bank LoRAs"]["answer_nll"]
    assert math.isfinite(functional["final_functional_loss"]) and functional["final_functional_loss"] > 0
    offset = saved["generators"]["task memory + holdout 0.5 + functional offset / description"]
    assert offset["offset_abs_mean"] > 0  # the functional loss trained the offset
    # its control: a multi-task LoRA with the functional training's base-model passes on top of its own steps
    budget = saved["loras"]["multitask_functional_budget"]
    assert budget["steps"] > saved["loras"]["multitask"]["steps"]

    page = (tmp_path / "out" / "bigbench_zero_shot_tiny.md").read_text()
    assert (
        page.startswith("# Benchmark: zero-shot LoRAs") and "## Held-out tasks" in page and "## How it works" in page
    )
    for plot in ("recovered", "generated_vs_retrieval", "task_vectors"):
        assert (tmp_path / "out" / f"bigbench_zero_shot_tiny_{plot}.png").stat().st_size > 0

    # A rerun trains and scores nothing: every LoRA, generator and score comes from the cache.
    again = benchmark.main(arguments)
    assert again["timings"]["scores_computed"] == 0
    assert again["heldout"] == results["heldout"]
    assert again["summary"] == results["summary"]
    # --report-only rewrites the page from the JSON alone.
    page = (tmp_path / "out" / "bigbench_zero_shot_tiny.md").read_text()
    (tmp_path / "out" / "bigbench_zero_shot_tiny.md").unlink()
    benchmark.main([*arguments, "--report-only"])
    assert (tmp_path / "out" / "bigbench_zero_shot_tiny.md").read_text() == page
    # ... and brings a stale summary in the JSON (written by older report code) up to date
    json_path = tmp_path / "out" / "bigbench_zero_shot_tiny.json"
    stale = json.loads(json_path.read_text())
    stale["summary"] = {"best_control": "stale"}
    json_path.write_text(json.dumps(stale))
    benchmark.main([*arguments, "--report-only"])
    assert json.loads(json_path.read_text())["summary"] == saved["summary"]


def test_selection_rules_and_family_split(tmp_path):
    from benchmarks.bigbench.data import load_task_files

    files = load_task_files(write_tiny_tasks(tmp_path))
    rules = SelectionRules(min_examples=30, max_tokens=48, train_examples=40, val_examples=4, test_examples=12)
    tokenizer = tiny_tokenizer()
    candidates, skipped = candidate_tasks(files, rules)
    assert "foreign/words" in skipped["not English"] and "short/few" in skipped["fewer raw examples than needed"]
    tasks = {path: check_task(path, files[path], tokenizer, rules) for path in candidates}
    for task in tasks.values():
        splits = task.splits
        assert len(splits["test"]) == 12 and len(splits["val"]) == 4 and len(splits["train"]) == 40
    assert tasks["first_word/prefixed"].input_prefix == "\nList: "
    assert tasks["parity/even"].multiple_choice and not tasks["addition/small"].multiple_choice
    assert check_task("x/y", files["first_word/plain"], tokenizer, replace(rules, max_tokens=3)) is None

    options = {"heldout_families": 2, "train_tasks_per_family": 2, "heldout_tasks_per_family": 1}
    for seed in range(5):  # any seed: held-out families never reach the bank
        result = select_and_split(files, tokenizer, rules, split_seed=seed, **options)
        split = result["split"]
        bank_families = {family_of(path) for path in split["train"]}
        assert bank_families.isdisjoint(split["heldout_families"]) and len(split["heldout_families"]) == 2
        assert all(family_of(path) in split["heldout_families"] for path in split["heldout"])
        assert len(split["heldout"]) == 2  # one task per held-out family
        assert len(split["train"]) == sum(family_of(path) not in split["heldout_families"] for path in candidates)
        assert set(result["tasks"]) == set(split["train"]) | set(split["heldout"])
    again = select_and_split(files, tokenizer, rules, split_seed=4, **options)
    assert again["split"] == split  # the same seed, the same split
    capped = select_and_split(files, tokenizer, rules, split_seed=0, max_train_tasks=2, **options)
    assert len(capped["split"]["train"]) == 2 and capped["counts"]["checked_tasks"] < len(candidates)
    with pytest.raises(ValueError, match="held out"):
        select_and_split(files, tokenizer, rules, split_seed=0, **{**options, "heldout_families": 99})


def test_bigbench_example_format():
    task = {"example_input_prefix": "\nQ: ", "append_choices_to_input": "false", "task_prefix": "Answer. "}
    input_prefix, output_prefix, choice_prefix, append = task_format(task)
    assert (input_prefix, output_prefix, choice_prefix, append) == ("Answer. \nQ: ", "\nA: ", "\n  choice: ", False)
    example = convert_example({"input": "2+2?", "target_scores": {"5": 0, "4": 1}}, "\n  choice: ", True)
    assert example.target == "4" and example.choices == ["4", "5"]
    assert example.input == "2+2?\n  choice: 4\n  choice: 5"
    assert convert_example({"input": "x", "target": ["", "y"]}, "", True).target == "y"
    assert convert_example({"input": "x", "target": ""}, "", True) is None
    assert convert_example({"input": "", "target": "y"}, "", True) is None
    assert not is_english("entailed_polarity_hindi", {"keywords": [], "examples": [{"input": "x"}]})
    assert not is_english("x", {"keywords": ["non-English"], "examples": []})
    assert not is_english("x", {"keywords": [], "examples": [{"input": "Привет мир, как дела"}]})
    assert is_english(
        "anachronisms",
        {"keywords": ["common sense"], "examples": [{"input": "A café opened in Paris in the year 1200"}]},
    )


def test_family_bootstrap_interval_covers_the_mean():
    rng = random.Random(0)
    values = {f"t{i}": rng.gauss(2.0, 0.5) for i in range(30)}
    families = {name: f"f{i // 2}" for i, name in enumerate(values)}
    mean, low, high = report._bootstrap(values, families, samples=500)
    assert low < mean < high and high - low < 1.0
    assert report._bootstrap({}, {}, samples=10) == (None, None, None)


def test_answer_tokens_are_scored_as_collect_trains_them():
    """The scorer and the collection path tokenize prompt and answer the same way (separately, no specials)."""
    from peft_cvae.collect import TaskData, TaskExample, task_dataset

    tokenizer = tiny_tokenizer()
    data = TaskData(name="t", examples=[TaskExample(input="red blue", target="red")])
    item = task_dataset(data, tokenizer, max_length=64)[0]
    answer = [label for label in item["labels"].tolist() if label != -100]
    assert answer[:-1] == tokenizer("red", add_special_tokens=False)["input_ids"]  # + EOS, not scored


def test_split_runs_are_pooled_task_by_task():
    """Two family splits: rows present in both are pooled over all their held-out tasks, the best control is chosen
    over the pool, and a design's difference and wins are counted task by task."""

    def run(seed: int, tasks: dict[str, tuple[str, dict]]) -> dict:
        results = {
            "settings": {"split_seed": seed, "bootstrap_samples": 200},
            "tasks": {task: {"family": family} for task, (family, _) in tasks.items()},
            "heldout": {
                task: {row: {"answer_nll": v, "accuracy": None} for row, v in {"oracle": 1.0, **rows}.items()}
                for task, (_, rows) in tasks.items()
            },
        }
        return {**results, "summary": report.summarize(results)}  # as main() hands runs to pool_splits

    design = "generated (x) from description"
    first = run(0, {
        "a": ("fa", {"base": 9.0, "multi-task LoRA": 4.0, "nearest description": 6.0, design: 3.0, "only here": 1.0}),
        "b": ("fb", {"base": 8.0, "multi-task LoRA": 5.0, "nearest description": 4.0, design: 4.5, "only here": 1.0}),
    })  # fmt: skip
    second = run(1, {"c": ("fc", {"base": 7.0, "multi-task LoRA": 3.0, "nearest description": 5.0, design: 3.5})})
    assert report.pool_splits({0: first}) is None  # one split: nothing to pool
    pooled = report.pool_splits({0: first, 1: second})
    assert pooled["tasks"] == 3 and pooled["splits"] == [0, 1]
    assert "only here" not in pooled["rows"]
    assert pooled["rows"]["multi-task LoRA"]["per_split"] == {0: 4.5, 1: 3.0}
    assert pooled["rows"]["multi-task LoRA"]["answer_nll"][0] == pytest.approx(4.0)
    assert pooled["best_control"] == "multi-task LoRA"  # 4.0 against nearest description's 5.0
    mean, low, high = pooled["differences"][design]
    assert mean == pytest.approx((-1.0 - 0.5 + 0.5) / 3) and low <= mean <= high
    assert pooled["wins"][design] == {"multi-task LoRA": 2, "nearest description": 2}
    # each split's own verdict: in split 0 the design wins both tasks and recovers (8.5 - 3.75) / 7.5 = 63% of the
    # oracle's gain; in split 1 it loses to the multi-task LoRA (3.5 against 3.0) and recovers 58%
    assert pooled["targets_met"] == {design: {0: ["beats every control", "recovers"], 1: []}}
    markdown = "\n".join(report.pooled_markdown(pooled))
    assert (
        "All family splits together" in markdown and f"| {design} | beats every control, recovers | none |" in markdown
    )


def test_issue_13_targets_are_checked_per_generated_design():
    """A design that wins everywhere meets every target; one that only beats the controls on average, steers on
    half the tasks and loses accuracy meets none of those."""
    strong, weak = "generated (strong) from description", "generated (weak) from description"
    heldout = {}
    for index in range(10):
        rows = {
            "base": (9.0, 0.2),
            "oracle": (1.0, 0.9),
            "multi-task LoRA": (5.0, 0.5),
            "nearest description": (6.0, 0.4),
        }
        rows[strong], rows[f"{strong}, shuffled"], rows[f"{strong}, random string"] = (
            (2.0, 0.8),
            (7.0, 0.3),
            (8.0, 0.3),
        )
        rows[weak] = (4.0 if index < 5 else 5.5, 0.1)  # 4.75 on average: below 5.0, but loses half the tasks
        rows[f"{weak}, shuffled"] = rows[f"{weak}, random string"] = (4.5, 0.1)
        heldout[f"t{index}"] = {row: {"answer_nll": nll, "accuracy": acc} for row, (nll, acc) in rows.items()}
    results = {
        "settings": {"bootstrap_samples": 300},
        "tasks": {task: {"family": f"f{index}"} for index, task in enumerate(heldout)},
        "heldout": heldout,
    }
    targets = report.summarize(results)["targets"]
    assert set(targets) == {strong, weak}  # shuffled / random-string rows are not designs
    assert targets[strong]["beats_every_control"] and targets[strong]["recovers"] and targets[strong]["steers"]
    assert targets[strong]["recovered"] == pytest.approx(7 / 8)
    assert targets[strong]["accuracy_control"] == "multi-task LoRA"
    assert targets[strong]["accuracy_difference"][0] == pytest.approx(0.3) and targets[strong]["accuracy_no_worse"]
    assert not targets[weak]["beats_every_control"]  # below every control on average, but its interval spans 0
    assert not targets[weak]["recovers"] and not targets[weak]["steers"] and not targets[weak]["accuracy_no_worse"]
    assert targets[weak]["steer_shares"] == [0.5, 0.5]
    assert "| generated (strong) from description | yes | 88% (yes)" in "\n".join(
        report._targets_markdown(report.summarize(results))
    )


def test_the_combined_condition_weighs_description_and_examples_alike():
    """Centred and normalised per part: the cosine of two combined vectors is the mean of the parts' cosines, though
    the raw in-context vectors share one large direction."""
    torch.manual_seed(0)
    shared = torch.full((6,), 50.0)  # what every raw in-context vector has in common
    names = ["a", "b", "c", "d"]
    vectors = {
        "description": {name: torch.randn(3) for name in [*names, "new"]},
        "examples": {name: shared + torch.randn(6) for name in [*names, "new"]},
    }
    combined = combined_conditions(vectors, names)
    assert set(combined) == {*names, "new"} and combined["a"].shape == (9,)

    def centred_cosine(kind, x, y):
        center = torch.stack([vectors[kind][name] for name in names]).mean(dim=0)
        return torch.nn.functional.cosine_similarity(vectors[kind][x] - center, vectors[kind][y] - center, dim=0)

    got = torch.nn.functional.cosine_similarity(combined["new"], combined["b"], dim=0)
    expected = (centred_cosine("description", "new", "b") + centred_cosine("examples", "new", "b")) / 2
    torch.testing.assert_close(got, expected)
    raw = torch.nn.functional.cosine_similarity(vectors["examples"]["new"], vectors["examples"]["b"], dim=0)
    assert raw > 0.99 and abs(centred_cosine("examples", "new", "b")) < 0.99  # centring is what lets examples count


def test_a_lora_scored_under_one_row_is_not_scored_again_under_another(tmp_path):
    """Two rows that write the same LoRA (retrieval by description and by examples picking one bank task) cost one
    score: the second reads the first's, with 0 seconds; a different LoRA is scored."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from benchmarks.bigbench.data import load_task_files
    from benchmarks.bigbench.pipeline import Scorer
    from benchmarks.bigbench.presets import preset
    from benchmarks.bigbench.tiny import tiny_base_model
    from peft_cvae.layout import LoraLayout

    settings = preset("tiny")
    tokenizer = tiny_tokenizer()
    base = tiny_base_model(tokenizer)
    files = load_task_files(write_tiny_tasks(tmp_path / "tasks"))
    task = check_task("first_word/plain", files["first_word/plain"], tokenizer, settings.rules)
    config = LoraConfig(r=settings.lora_r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    lora = get_peft_model(tiny_base_model(tokenizer), config)
    layout = LoraLayout.from_peft_model(lora)
    vector = layout.flatten(get_peft_model_state_dict(lora))
    scorer = Scorer(base, tokenizer, layout, settings, tmp_path / "cache")

    first = scorer.score(task, "nearest description", "a", vector)
    again = scorer.score(task, "nearest by examples", "b", vector.clone())
    assert scorer.scored == 1 and again["seconds"] == 0.0
    assert again["example_nll"] == first["example_nll"] and again["answer_nll"] == first["answer_nll"]
    other = scorer.score(task, "top-k mix", "c", vector * 0.5)
    assert scorer.scored == 2 and other["answer_nll"] != first["answer_nll"]
