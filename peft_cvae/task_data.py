"""What a LoRA is fine-tuned on: one `TaskData` per task, read from a task spec file, text files, a dataset or a
BIG-bench-style `task.json`.

A task is either *documents* (`texts`: causal-LM loss on every token) or *prompt/answer pairs* (`examples`: loss on
the answer tokens only). Example tasks follow BIG-bench's JSON task format, so a BIG-bench `task.json` is read as it
is: the prompt of an example is `input_prefix + input + output_prefix` and the answer is its `target` (for a
multiple-choice example, the highest-scoring key of `target_scores`; the choices are appended to the input as
BIG-bench does unless `append_choices_to_input` is false).

A task spec is a JSON list with one object per task (relative paths are relative to the spec file):

    [
      {"name": "sport", "description": "match reports", "files": ["sport/*.txt"]},
      {"name": "code", "description": "Python code", "dataset": "json", "data_files": "code.jsonl",
       "text_column": "text", "split": "train"},
      {"name": "sums", "description": "adding numbers", "examples": [{"input": "2 + 2", "target": "4"}]},
      {"name": "logic", "task_json": "bigbench/logical_deduction/task.json"}
    ]

A task may also name held-out texts, never trained on: `"test_files": ["sport_test/*.txt"]`, or for a `dataset`
`"test_split": "test"` (the same dataset, another split); `collect` then reports their perplexity before and after
fine-tuning.

Task names become folder names (`collect --save-adapters FOLDER/<task>`) and Hub paths, so `check_task_name` refuses
anything that is not one plain path component, wherever a name enters the library.
"""

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, InvalidConfigError, MissingFileError

__all__ = ["TaskData", "TaskExample", "check_task_name", "read_task_spec", "read_text_file", "text_files"]

MAX_TASK_NAME_BYTES = 255  # the longest file name most file systems accept
DEFAULT_INPUT_PREFIX = "\nQ: "  # BIG-bench's example_input_prefix / example_output_prefix / choice_prefix
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
SPEC_FIELDS = {
    "name", "description", "files", "dataset", "data_files", "split", "text_column", "examples", "task_json",
    "input_prefix", "output_prefix", "choice_prefix", "append_choices_to_input", "test_files", "test_split",
}  # fmt: skip
SOURCES = ("files", "dataset", "examples", "task_json")


def check_task_name(name) -> str:
    """Return `name` if it is safe as one folder name; otherwise raise `InvalidConfigError` saying why.

    A task name is used as a path component (adapter folders, Hub paths), so it must not be able to leave the folder
    it is joined to: no path separators, not "." or "..", no NUL or control characters, at most 255 bytes. Names that
    differ only by case are allowed (they are different tasks).
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidConfigError(f"A task name must be a non-empty string, got {name!r}.")
    problem = None
    if name in (".", ".."):
        problem = "is a relative folder reference"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator ('/' or '\\')"
    elif any(ord(character) < 32 or ord(character) == 127 for character in name):
        problem = "contains a NUL or control character"
    elif len(name.encode("utf-8", errors="surrogatepass")) > MAX_TASK_NAME_BYTES:
        problem = f"is longer than {MAX_TASK_NAME_BYTES} bytes"
    if problem:
        raise InvalidConfigError(
            f"The task name {name!r} {problem}; task names become folder names, so they must be one plain path "
            "component. Rename the task (e.g. 'arithmetic_2digit')."
        )
    return name


@dataclass
class TaskExample:
    """One prompt/answer pair. `choices` lists the options of a multiple-choice example (the target is one of them)."""

    input: str
    target: str
    choices: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.input, str) or not isinstance(self.target, str):
            raise InvalidConfigError(
                f"An example needs a string 'input' and 'target', got {type(self.input).__name__} and "
                f"{type(self.target).__name__}."
            )
        if not self.target.strip():
            raise InvalidConfigError(
                f"The example {self.input[:40]!r} has an empty target; there is nothing to learn."
            )
        if self.choices is not None and (
            not isinstance(self.choices, list) or not all(isinstance(choice, str) for choice in self.choices)
        ):
            raise InvalidConfigError(f"The choices of example {self.input[:40]!r} must be a list of strings.")


@dataclass
class TaskData:
    """The training data of one task: documents (`texts`) or prompt/answer pairs (`examples`), exactly one of them.

    Args:
        name: the task's name (one plain path component, see `check_task_name`).
        description: what the task is, in words; `--condition text` embeds it as the task's condition vector.
        texts: documents, trained with a causal-LM loss on every token in blocks of `max_length` tokens.
        examples: prompt/answer pairs, trained with the loss on the answer tokens only.
        input_prefix, output_prefix: an example's prompt is `input_prefix + input + output_prefix`; its answer is
            `target` + the tokenizer's EOS token (BIG-bench's `example_input_prefix`, `example_output_prefix`).
        test_texts: held-out texts, never trained on; `collect` reports the perplexity on them before and after
            fine-tuning (spec fields `test_files`, or `test_split` for a `dataset`).
    """

    name: str
    description: str = ""
    texts: list[str] | None = None
    examples: list[TaskExample] | None = None
    input_prefix: str = DEFAULT_INPUT_PREFIX
    output_prefix: str = DEFAULT_OUTPUT_PREFIX
    test_texts: list[str] | None = None

    def __post_init__(self):
        check_task_name(self.name)
        if self.test_texts is not None:
            if not isinstance(self.test_texts, list) or not all(isinstance(text, str) for text in self.test_texts):
                raise InvalidConfigError(f"The test_texts of task {self.name!r} must be a list of strings.")
            self.test_texts = [text.strip() for text in self.test_texts if text.strip()]
            if not self.test_texts:
                raise InvalidConfigError(
                    f"Task {self.name!r} has test texts, but all of them are empty. Add text or leave them out."
                )
        if not isinstance(self.description, str):
            raise InvalidConfigError(f"The description of task {self.name!r} must be a string.")
        if (self.texts is None) == (self.examples is None):
            raise InvalidConfigError(
                f"Task {self.name!r} needs exactly one of texts= (documents) or examples= (prompt/answer pairs)."
            )
        if self.texts is not None:
            if not isinstance(self.texts, list) or not all(isinstance(text, str) for text in self.texts):
                raise InvalidConfigError(f"The texts of task {self.name!r} must be a list of strings.")
            if not any(text.strip() for text in self.texts):
                raise InvalidConfigError(f"Task {self.name!r} has no non-empty text.")
        else:
            self.examples = [
                example if isinstance(example, TaskExample) else TaskExample(**example) for example in self.examples
            ]
            if not self.examples:
                raise InvalidConfigError(f"Task {self.name!r} has no examples.")
        if not isinstance(self.input_prefix, str) or not isinstance(self.output_prefix, str):
            raise InvalidConfigError(f"The input_prefix and output_prefix of task {self.name!r} must be strings.")

    def prompt(self, example: TaskExample) -> str:
        """The text the model is given for `example`; the answer (`example.target`) follows it directly."""
        return self.input_prefix + example.input + self.output_prefix

    def sample_texts(self, count: int) -> list[str]:
        """Up to `count` texts of the task (whole prompt + answer for examples): the in-context condition's input."""
        if self.texts is not None:
            return [text for text in self.texts if text.strip()][:count]
        return [self.prompt(example) + example.target for example in self.examples[:count]]


# ---- files ---------------------------------------------------------------------------------------------------------
def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a file, with clear errors for a missing or non-UTF-8 file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise MissingFileError(f"The file {path} does not exist. Check the path.") from error
    except UnicodeDecodeError as error:
        raise CorruptFileError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}). Convert it to UTF-8."
        ) from error


def text_files(patterns: list[str], base: Path | None = None) -> list[Path]:
    """Files named by paths, folders (their *.txt files) or glob patterns, in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser()) if base is None else str(base / Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise MissingFileError(f"No file matches {pattern!r}. Check the pattern.")
        for match in map(Path, matches):
            if match.is_dir():
                files.extend(sorted(match.glob("*.txt")))
            elif match.is_file():
                files.append(match)
            else:
                raise MissingFileError(f"The text file {match} does not exist. Check the path.")
    if not files:
        raise MissingFileError(f"No text files found in {', '.join(patterns)}.")
    return files


def _read_json(path: Path, what: str):
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"The {what} {path} is not valid JSON: {error}.") from error


# ---- the spec ------------------------------------------------------------------------------------------------------
def read_task_spec(path: str | Path) -> list[TaskData]:
    """Read a task spec file (see the module docstring) into one `TaskData` per task, with every text loaded.

    Everything is read and checked here, before any training starts: a bad task late in the spec fails in seconds.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"The task spec {path} does not exist. Check the path.")
    spec = _read_json(path, "task spec")
    if isinstance(spec, dict) and isinstance(spec.get("tasks"), list):
        spec = spec["tasks"]
    if not isinstance(spec, list) or not spec:
        raise InvalidConfigError(
            f"The task spec {path} must be a non-empty JSON list of tasks, e.g. "
            '[{"name": "sport", "description": "match reports", "files": ["sport/*.txt"]}].'
        )
    tasks, names = [], set()
    for index, entry in enumerate(spec):
        task = _read_spec_entry(entry, f"task #{index + 1} of {path}", path.parent)
        if task.name in names:
            raise InvalidConfigError(f"Task {task.name!r} appears twice in {path}; task names must be unique.")
        names.add(task.name)
        tasks.append(task)
    return tasks


def _read_spec_entry(entry, where: str, folder: Path) -> TaskData:
    if not isinstance(entry, dict):
        raise InvalidConfigError(
            f"The {where} is a JSON {type(entry).__name__}; expected an object with name and files."
        )
    unknown = set(entry) - SPEC_FIELDS
    if unknown:
        raise InvalidConfigError(f"The {where} has unknown fields {sorted(unknown)}; check their spelling.")
    sources = [source for source in SOURCES if source in entry]
    if "task_json" in entry:
        entry = _merge_task_json(entry, folder, where)
    if not isinstance(entry.get("name"), str) or not entry["name"]:
        raise InvalidConfigError(f"The {where} has no 'name' (a non-empty string).")
    name = entry["name"]
    where = f"task {name!r} ({where})"
    if not isinstance(entry.get("description", ""), str):
        raise InvalidConfigError(f"The 'description' of {where} must be a string.")
    if len(sources) != 1:
        raise InvalidConfigError(
            f"{where[0].upper()}{where[1:]} needs exactly one of 'files' (a list of text files), 'dataset' (a "
            "datasets.load_dataset name or folder, with 'text_column'), 'examples' (prompt/answer pairs) or "
            "'task_json' (a BIG-bench task.json)."
        )
    common = {"name": check_task_name(name), "description": entry.get("description", "")}
    common["test_texts"] = _test_texts(entry, folder, where)
    if "files" in entry:
        files = entry["files"]
        if not isinstance(files, list) or not files or not all(isinstance(file, str) for file in files):
            raise InvalidConfigError(f"The 'files' of {where} must be a non-empty list of paths.")
        texts = [read_text_file(file).strip() for file in text_files(files, folder)]
        return _with_texts(common, texts, where)
    if "dataset" in entry:
        return _with_texts(common, _dataset_texts(entry, folder, where), where)
    prefixes = {
        "input_prefix": entry.get("input_prefix", DEFAULT_INPUT_PREFIX),
        "output_prefix": entry.get("output_prefix", DEFAULT_OUTPUT_PREFIX),
    }
    examples = _read_examples(entry, where)
    return TaskData(**common, examples=examples, **prefixes)


def _test_texts(entry: dict, folder: Path, where: str) -> list[str] | None:
    """The held-out texts a spec entry names: `test_files` (like `files`) or `test_split` (another split of its
    `dataset`)."""
    if "test_files" in entry and "test_split" in entry:
        raise InvalidConfigError(f"{where[0].upper()}{where[1:]} sets both 'test_files' and 'test_split'; keep one.")
    if "test_files" in entry:
        files = entry["test_files"]
        if not isinstance(files, list) or not files or not all(isinstance(file, str) for file in files):
            raise InvalidConfigError(f"The 'test_files' of {where} must be a non-empty list of paths.")
        return [read_text_file(file).strip() for file in text_files(files, folder)]
    if "test_split" in entry:
        if "dataset" not in entry:
            raise InvalidConfigError(
                f"The 'test_split' of {where} names a split of its 'dataset', but it has none; use 'test_files'."
            )
        if not isinstance(entry["test_split"], str):
            raise InvalidConfigError(f"The 'test_split' of {where} must be a split name such as \"test\".")
        return _dataset_texts({**entry, "split": entry["test_split"]}, folder, where)
    return None


def _with_texts(common: dict, texts: list[str], where: str) -> TaskData:
    texts = [text for text in texts if text]
    if not texts:
        raise InvalidConfigError(f"{where[0].upper()}{where[1:]} has no non-empty text.")
    return TaskData(**common, texts=texts)


def _merge_task_json(entry: dict, folder: Path, where: str) -> dict:
    """The spec entry with the fields of its BIG-bench task.json filled in (the entry's own fields win)."""
    if not isinstance(entry["task_json"], str):
        raise InvalidConfigError(f"The 'task_json' of the {where} must be a path to a task.json file.")
    path = folder / Path(entry["task_json"]).expanduser()
    task = _read_json(path, "BIG-bench task file")
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise InvalidConfigError(
            f"{path} is not a BIG-bench JSON task (an object with an 'examples' list). Programmatic BIG-bench tasks "
            "(task.py) cannot be read; convert their examples to a task.json."
        )
    renames = {
        "example_input_prefix": "input_prefix",
        "example_output_prefix": "output_prefix",
        "choice_prefix": "choice_prefix",
        "append_choices_to_input": "append_choices_to_input",
        "name": "name",
        "description": "description",
        "examples": "examples",
    }
    merged = {ours: task[theirs] for theirs, ours in renames.items() if theirs in task}
    merged.update({key: value for key, value in entry.items() if key != "task_json"})
    return merged


def _read_examples(entry: dict, where: str) -> list[TaskExample]:
    """BIG-bench examples -> `TaskExample`s: `target` (a string or a list of accepted strings, the first trained on)
    or `target_scores` ({choice: score}; the target is the best choice, the choices are appended to the input)."""
    raw = entry["examples"]
    if not isinstance(raw, list) or not raw:
        raise InvalidConfigError(f"The 'examples' of {where} must be a non-empty list of {{input, target}} objects.")
    choice_prefix = entry.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
    append_choices = entry.get("append_choices_to_input", True)
    examples = []
    for number, example in enumerate(raw, start=1):
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise InvalidConfigError(f"Example {number} of {where} needs a string 'input'.")
        scores = example.get("target_scores")
        target, choices = example.get("target"), None
        if scores is not None:
            if (
                not isinstance(scores, dict)
                or not scores
                or not all(isinstance(s, (int, float)) for s in scores.values())
            ):
                raise InvalidConfigError(
                    f"The 'target_scores' of example {number} of {where} must map each choice to a number."
                )
            choices = sorted(scores)  # BIG-bench shuffles them; sorted keeps training deterministic
            if target is None:
                best = max(scores.values())
                target = next(choice for choice in scores if scores[choice] == best)
        if isinstance(target, list) and target and all(isinstance(t, str) for t in target):
            target = target[0]
        if not isinstance(target, str):
            raise InvalidConfigError(
                f"Example {number} of {where} needs a 'target' (a string or a list of strings) or 'target_scores'."
            )
        text = example["input"]
        if choices and append_choices:
            text = text + choice_prefix + choice_prefix.join(choices)
        try:
            examples.append(TaskExample(input=text, target=target, choices=choices))
        except InvalidConfigError as error:
            raise InvalidConfigError(f"Example {number} of {where}: {error}") from error
    return examples


def _dataset_texts(entry: dict, folder: Path, where: str) -> list[str]:
    """One text per row of the dataset's text column (`datasets.load_dataset`; local paths relative to the spec)."""
    import datasets

    name = entry["dataset"]
    if not isinstance(name, str):
        raise InvalidConfigError(f"The 'dataset' of {where} must be a string.")
    if (folder / name).exists():
        name = str(folder / name)
    data_files = entry.get("data_files")
    if isinstance(data_files, str):
        data_files = str(folder / data_files)
    elif isinstance(data_files, list):
        data_files = [str(folder / file) for file in data_files]
    column = entry.get("text_column", "text")
    try:
        dataset = datasets.load_dataset(name, data_files=data_files, split=entry.get("split", "train"))
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise InvalidConfigError(f"Cannot load the dataset of {where} ({name!r}): {error}") from error
    if column not in dataset.column_names:
        raise InvalidConfigError(
            f"The dataset of {where} has no column {column!r}; its columns are {dataset.column_names}. Set "
            "'text_column' in the spec."
        )
    return [str(text).strip() for text in dataset[column] if text is not None]
