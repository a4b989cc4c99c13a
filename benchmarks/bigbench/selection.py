"""Which BIG-bench tasks the benchmark uses, by written rules, and the split of their families into bank / held-out.

Rules (nothing is picked by hand; `select_and_split` applies them to whatever task files it is given):

1. A JSON task: its `task.json` has an `examples` list (programmatic `task.py` tasks and family index files have none).
2. English: no keyword among `NON_ENGLISH_KEYWORDS`, and no part of its path (split at `/` and `_`) among
   `LANGUAGE_NAME_PARTS` (catches e.g. `linguistic_mappings/de_past_tense_json` and `entailed_polarity_hindi`, whose
   keywords do not say so), and at most 10% of the letters of its first examples outside ASCII.
3. Usable examples: a string `input`, a non-empty answer (`target`, or the best key of `target_scores`), and
   prompt + answer at most `max_tokens` base-model tokens (for multiple choice: the prompt with the choices appended
   and the longest choice). Examples are visited in an order drawn from `data_seed` and the task's name, so the
   kept ones are an unbiased sample; a task needs `min_examples` usable examples among the first
   `VISIT_FACTOR` x (test + validation + training caps) visited.
4. Per task, the usable examples are split in that order: test first (at most `test_examples`, at most a third),
   then validation (at most `val_examples`, at most a tenth), then training (at most `train_examples`).
5. Family = the top-level folder under `benchmark_tasks` (`arithmetic/2_digit_addition` -> `arithmetic`). Families
   are shuffled with `split_seed`; the first `heldout_families` are held out. A held-out family contributes no
   example and no checkpoint to the bank, the multi-task LoRA or any tuning. Within a family, at most
   `train_tasks_per_family` (bank families) or `heldout_tasks_per_family` (held-out families) tasks are used, drawn
   with `split_seed`, so that families with dozens of near-identical variants (`natural_instructions`,
   `arithmetic`, `bbq_lite_json`) do not dominate.

Prompt format (BIG-bench's zero-shot format, as `peft_cvae.task_data` reads a `task.json`): the prompt is
`task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(sorted choices)] +
example_output_prefix`, the answer the target. Defaults: `"\\nQ: "`, `"\\nA: "`, `"\\n  choice: "`.
"""

import random
import re
from dataclasses import dataclass, field

from peft_cvae.collect import TaskData, TaskExample

__all__ = [
    "BenchTask",
    "SelectionRules",
    "candidate_tasks",
    "check_task",
    "family_of",
    "safe_task_name",
    "select_and_split",
    "task_format",
]

NON_ENGLISH_KEYWORDS = frozenset({"non-english", "low-resource language", "multilingual", "translation"})
LANGUAGE_NAME_PARTS = frozenset(
    {"de", "fr", "es", "it", "pl", "ru", "zh", "ja", "ko", "hi", "fa", "ar", "sw", "hindi", "persian", "parsinlu"}
    | {"german", "french", "spanish", "italian", "polish", "russian", "chinese", "japanese", "korean", "arabic"}
    | {"swahili", "kannada", "bengali", "urdu", "hinglish", "swedish", "dutch", "portuguese", "turkish"}
)
MAX_NON_ASCII_LETTER_SHARE = 0.10
VISIT_FACTOR = 3  # examples visited per example needed
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "


@dataclass
class SelectionRules:
    """The numbers the rules above use; part of every cache key that depends on the selection."""

    min_examples: int = 100
    max_tokens: int = 256
    train_examples: int = 200
    val_examples: int = 20
    test_examples: int = 100
    data_seed: int = 0


@dataclass
class BenchTask:
    """One selected task: its BIG-bench path, family, description, prompt format and example splits."""

    path: str  # "arithmetic/2_digit_addition"
    family: str
    description: str
    keywords: list[str]
    multiple_choice: bool
    input_prefix: str
    output_prefix: str
    splits: dict[str, list[TaskExample]] = field(repr=False)

    @property
    def name(self) -> str:
        return safe_task_name(self.path)

    def task_data(self, split: str = "train") -> TaskData:
        """The split as a `peft_cvae.collect.TaskData` (the collection path's input)."""
        return TaskData(
            name=self.name,
            description=self.description,
            examples=list(self.splits[split]),
            input_prefix=self.input_prefix,
            output_prefix=self.output_prefix,
        )


def safe_task_name(path: str) -> str:
    """A BIG-bench path as one plain path component (task names become folder names): `/` -> `.`."""
    return path.replace("/", ".")


def family_of(path: str) -> str:
    return path.split("/", 1)[0]


def task_format(task: dict) -> tuple[str, str, str, bool]:
    """(input prefix, output prefix, choice prefix, append choices) of a task.json, BIG-bench's defaults filled in."""
    input_prefix = task.get("task_prefix", "") + task.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    choice_prefix = task.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
    append = task.get("append_choices_to_input", True)
    append = append.strip().lower() != "false" if isinstance(append, str) else bool(append)
    return input_prefix, output_prefix, choice_prefix, append


def convert_example(example, choice_prefix: str, append_choices: bool) -> TaskExample | None:
    """A BIG-bench example -> `TaskExample`, or None when it is not usable (no input, no answer)."""
    if not isinstance(example, dict) or not isinstance(example.get("input"), str) or not example["input"].strip():
        return None
    scores, target, choices = example.get("target_scores"), example.get("target"), None
    if isinstance(scores, dict) and scores:
        if not all(isinstance(key, str) and isinstance(value, (int, float)) for key, value in scores.items()):
            return None
        choices = sorted(scores)  # BIG-bench shuffles them; sorted keeps the prompts deterministic
        best = max(scores.values())
        target = next(choice for choice in scores if scores[choice] == best)
    if isinstance(target, list):
        target = next((item for item in target if isinstance(item, str) and item.strip()), None)
    if not isinstance(target, str) or not target.strip():
        return None
    if choices is not None and any(not choice.strip() for choice in choices):
        return None
    text = example["input"]
    if choices and append_choices:
        text = text + choice_prefix + choice_prefix.join(choices)
    return TaskExample(input=text, target=target, choices=choices)


def is_english(path: str, task: dict) -> bool:
    keywords = {str(keyword).strip().lower() for keyword in task.get("keywords", [])}
    if keywords & NON_ENGLISH_KEYWORDS:
        return False
    if set(re.split(r"[/_]", path.lower())) & LANGUAGE_NAME_PARTS:
        return False
    sample = "".join(str(e.get("input", "")) for e in task["examples"][:50] if isinstance(e, dict))
    letters = [character for character in sample if character.isalpha()]
    non_ascii = sum(not character.isascii() for character in letters)
    return not letters or non_ascii / len(letters) <= MAX_NON_ASCII_LETTER_SHARE


def _usable_examples(path: str, task: dict, tokenizer, rules: SelectionRules) -> list[TaskExample]:
    """The task's usable examples in the seeded order, at most as many as its splits need.

    At most `VISIT_FACTOR` x that many examples are visited (tasks of 50,000 examples whose prompts are nearly all
    too long would otherwise be tokenized whole). Examples whose UTF-8 size is within `max_tokens` are kept without
    tokenizing: a byte-level tokenizer never makes more tokens than bytes.
    """
    input_prefix, output_prefix, choice_prefix, append = task_format(task)
    order = list(range(len(task["examples"])))
    random.Random(f"{rules.data_seed}/{path}").shuffle(order)
    wanted = max(rules.min_examples, rules.test_examples + rules.val_examples + rules.train_examples)
    order = order[: VISIT_FACTOR * wanted]
    kept: list[TaskExample] = []
    for start in range(0, len(order), 256):
        converted = [convert_example(task["examples"][i], choice_prefix, append) for i in order[start : start + 256]]
        converted = [example for example in converted if example is not None]
        prompts = [input_prefix + e.input + output_prefix for e in converted]
        answers = [max(e.choices, key=len) if e.choices else e.target for e in converted]
        sizes = [len(p.encode()) + len(a.encode()) for p, a in zip(prompts, answers)]
        unsure = [i for i, size in enumerate(sizes) if size > rules.max_tokens]
        lengths = dict.fromkeys(range(len(converted)), 0)
        if unsure:
            prompt_ids = tokenizer([prompts[i] for i in unsure], add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer([answers[i] for i in unsure], add_special_tokens=False)["input_ids"]
            for i, prompt, answer in zip(unsure, prompt_ids, answer_ids):
                lengths[i] = len(prompt) + len(answer)
        kept.extend(example for i, example in enumerate(converted) if lengths[i] <= rules.max_tokens)
        if len(kept) >= wanted:
            break
    return kept[:wanted]


def _split(examples: list[TaskExample], rules: SelectionRules) -> dict[str, list[TaskExample]]:
    count = len(examples)
    test = min(rules.test_examples, count // 3)
    val = min(rules.val_examples, count // 10)
    return {
        "test": examples[:test],
        "val": examples[test : test + val],
        "train": examples[test + val : test + val + rules.train_examples],
    }


def candidate_tasks(task_files: dict[str, dict], rules: SelectionRules) -> tuple[list[str], dict[str, list[str]]]:
    """The cheap rules (1 and 2, and the raw example count): candidate paths, and the skipped ones by reason."""
    candidates, skipped = [], {"no examples": [], "fewer raw examples than needed": [], "not English": []}
    for path in sorted(task_files):
        task = task_files[path]
        if not isinstance(task.get("examples"), list) or not task["examples"]:
            skipped["no examples"].append(path)
        elif len(task["examples"]) < rules.min_examples:
            skipped["fewer raw examples than needed"].append(path)
        elif not is_english(path, task):
            skipped["not English"].append(path)
        else:
            candidates.append(path)
    return candidates, skipped


def check_task(path: str, task: dict, tokenizer, rules: SelectionRules) -> BenchTask | None:
    """Rules 3 and 4 for one candidate: the task with its example splits, or None (too few usable examples)."""
    examples = _usable_examples(path, task, tokenizer, rules)
    if len(examples) < rules.min_examples:
        return None
    input_prefix, output_prefix, _, _ = task_format(task)
    return BenchTask(
        path=path,
        family=family_of(path),
        description=str(task.get("description", "")).strip() or path,
        keywords=[str(k) for k in task.get("keywords", [])],
        multiple_choice=examples[0].choices is not None,
        input_prefix=input_prefix,
        output_prefix=output_prefix,
        splits=_split(examples, rules),
    )


def select_and_split(
    task_files: dict[str, dict],
    tokenizer,
    rules: SelectionRules,
    *,
    split_seed: int,
    heldout_families: int,
    train_tasks_per_family: int,
    heldout_tasks_per_family: int,
    max_train_tasks: int | None = None,
    progress=None,
) -> dict:
    """Apply the rules and draw the family split (rule 5); returns the used tasks, the split and the counts.

    Families of candidate tasks are shuffled with `split_seed` (and the tasks within each family too). Walking that
    order, the first `heldout_families` families with a usable task are held out; the others form the bank, which
    takes the i-th usable task of every bank family in round i (up to `train_tasks_per_family` rounds, and at most
    `max_train_tasks` tasks). The token rule (tokenizing thousands of examples) runs only on the tasks this walk
    reaches, in the walk's order, so the result equals checking every task first: a task is used exactly when it is
    usable and the walk reaches it.
    """
    candidates, skipped = candidate_tasks(task_files, rules)
    skipped["too few usable examples"] = []
    families: dict[str, list[str]] = {}
    for path in candidates:
        families.setdefault(family_of(path), []).append(path)
    names = sorted(families)
    rng = random.Random(split_seed)
    rng.shuffle(names)
    for family in names:
        rng.shuffle(families[family])
    usable: dict[str, list[BenchTask]] = {family: [] for family in names}
    visited = dict.fromkeys(names, 0)
    bar = progress(total=len(candidates), desc="Checking tasks", unit="task") if progress else None

    def nth_usable(family: str, index: int) -> BenchTask | None:
        while len(usable[family]) <= index and visited[family] < len(families[family]):
            path = families[family][visited[family]]
            visited[family] += 1
            task = check_task(path, task_files[path], tokenizer, rules)
            if task is None:
                skipped["too few usable examples"].append(path)
            else:
                usable[family].append(task)
            if bar is not None:
                bar.update(1)
        return usable[family][index] if index < len(usable[family]) else None

    heldout_names, train_names = [], []
    for family in names:
        if len(heldout_names) < heldout_families:
            if nth_usable(family, 0) is not None:
                heldout_names.append(family)
        else:
            train_names.append(family)
    if len(heldout_names) < heldout_families:
        raise ValueError(
            f"Only {len(heldout_names)} families have a usable task; {heldout_families} were to be held out."
        )
    heldout = [t for family in heldout_names for i in range(heldout_tasks_per_family) if (t := nth_usable(family, i))]
    train: list[BenchTask] = []
    for index in range(train_tasks_per_family):
        for family in train_names:
            if max_train_tasks is not None and len(train) >= max_train_tasks:
                break
            task = nth_usable(family, index)
            if task is not None:
                train.append(task)
    if bar is not None:
        bar.close()
    if not train:
        raise ValueError("No bank family has a usable task: hold out fewer families or relax the rules.")
    checked = sum(visited.values())
    return {
        "tasks": {task.path: task for task in heldout + train},
        "split": {
            "train": [task.path for task in train],
            "heldout": [task.path for task in heldout],
            "train_families": sorted({task.family for task in train}),
            "heldout_families": sorted(heldout_names),
        },
        "skipped": skipped,
        "counts": {
            "task_files": len(task_files),
            "candidate_tasks": len(candidates),
            "candidate_families": len(names),
            "checked_tasks": checked,
            "usable_of_checked": sum(len(tasks) for tasks in usable.values()),
            "multiple_choice_used": sum(task.multiple_choice for task in heldout + train),
            "generative_used": sum(not task.multiple_choice for task in heldout + train),
        },
    }
