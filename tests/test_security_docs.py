"""docs/security.md's table "Each bad input and what the user sees" is generated from the tests, so it cannot drift.

Each row is one case of a test in `tests/test_bad_input.py` or `tests/test_reliability.py` (one row per parametrized
case): the error class comes from the test's `pytest.raises(...)`, and the message column lists exactly what the
test asserts the message says (the `assert_says(...)` fragments and `match=` patterns, read from the test's source
with `ast`, parametrized values resolved). Only the "bad input" wording is written here, in `ROWS`. A fragment built
at run time (an f-string, `repr(key)`) is not shown: the table claims only what a literal in the test checks.

Regenerate after changing those tests: `python -m tests.test_security_docs --write`.
"""

import ast
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
START, END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"

# (test file, test function, what the user did). Every parametrized case of the test becomes a row.
ROWS = [
    ("test_bad_input.py", "test_adapter_of_another_layout_is_refused_by_the_bank", "Adapter of another layout"),
    (
        "test_bad_input.py",
        "test_generated_adapter_refuses_a_base_model_of_other_shapes_and_leaves_it_unchanged",
        "Generated adapter loaded into another base model",
    ),
    (
        "test_bad_input.py",
        "test_generated_adapter_refuses_to_be_added_to_a_peft_model_of_other_shapes",
        "Generated adapter added to a PEFT model of other shapes",
    ),
    (
        "test_bad_input.py",
        "test_adapter_state_dict_of_another_layout_is_not_written",
        "Saving an adapter state dict of another layout",
    ),
    (
        "test_bad_input.py",
        "test_training_a_generator_on_a_bank_of_another_layout_is_refused",
        "Training a generator on a bank of another layout",
    ),
    ("test_bad_input.py", "test_unsupported_peft_types_are_refused", "Unsupported PEFT type"),
    ("test_bad_input.py", "test_two_conditions_for_one_adapter_are_refused", "Two conditions for one adapter"),
    ("test_bad_input.py", "test_condition_of_the_wrong_size_is_refused", "Condition of the wrong size"),
    (
        "test_bad_input.py",
        "test_condition_of_the_wrong_size_is_refused_by_the_bank",
        "Bank conditions of different sizes",
    ),
    ("test_bad_input.py", "test_condition_with_nan_is_refused", "Condition with NaN/Inf"),
    ("test_bad_input.py", "test_unknown_task_name_is_refused", "Unknown task name"),
    ("test_bad_input.py", "test_empty_bank_is_refused", "Empty bank (no adapters)"),
    (
        "test_bad_input.py",
        "test_bank_without_checkpoints_or_with_one_cannot_train",
        "Bank with no checkpoint or one",
    ),
    ("test_bad_input.py", "test_checkpoint_with_nan_or_inf_is_refused", "NaN or Inf in a checkpoint"),
    ("test_bad_input.py", "test_bank_folder_with_a_nan_checkpoint_is_refused", "Bank folder with a NaN checkpoint"),
    ("test_bad_input.py", "test_damaged_adapter_weights_are_refused", "Damaged adapter_model.safetensors"),
    ("test_bad_input.py", "test_damaged_generator_weights_are_refused", "Damaged generator model.safetensors"),
    ("test_bad_input.py", "test_damaged_bank_files_are_refused", "Damaged bank file"),
    (
        "test_bad_input.py",
        "test_bank_checkpoint_with_a_flipped_bit_in_tensor_data_is_refused",
        "One flipped bit in a bank checkpoint's tensor data",
    ),
    (
        "test_bad_input.py",
        "test_bank_manifest_with_a_malformed_checksum_is_refused",
        "bank.json with a malformed checksum",
    ),
    ("test_bad_input.py", "test_bank_checkpoint_with_another_dtype_is_refused", "Bank checkpoint of another dtype"),
    (
        "test_bad_input.py",
        "test_generator_config_with_missing_or_wrong_fields_is_refused",
        "Generator config.json with a missing or wrong field",
    ),
    (
        "test_bad_input.py",
        "test_generator_config_that_is_not_a_json_object_is_refused",
        "Generator config.json that is not a JSON object",
    ),
    (
        "test_bad_input.py",
        "test_adapter_config_with_wrong_fields_is_refused",
        "adapter_config.json with a wrong field",
    ),
    (
        "test_bad_input.py",
        "test_bank_manifest_with_missing_or_wrong_fields_is_refused",
        "bank.json with a missing or wrong field",
    ),
    ("test_bad_input.py", "test_generator_folder_without_weights_is_refused", "Generator folder without weights"),
    ("test_bad_input.py", "test_generator_folder_without_config_is_refused", "Generator folder without config.json"),
    (
        "test_bad_input.py",
        "test_generator_folder_with_only_pickled_weights_is_refused",
        "Generator folder with only a pickled pytorch_model.bin",
    ),
    (
        "test_bad_input.py",
        "test_adapter_folder_without_weights_or_config_is_refused",
        "Adapter folder without weights or config",
    ),
    (
        "test_bad_input.py",
        "test_bank_manifest_pointing_to_missing_files_is_refused",
        "bank.json pointing to a missing file",
    ),
    (
        "test_bad_input.py",
        "test_bank_manifest_pointing_outside_the_bank_is_refused",
        "bank.json pointing outside the bank",
    ),
    (
        "test_bad_input.py",
        "test_bank_checkpoint_that_is_a_symlink_out_of_the_bank_is_refused",
        "Bank checkpoint that is a symlink out of the bank",
    ),
    ("test_bad_input.py", "test_output_folder_below_a_file_is_refused_and_nothing_is_written", "Saving below a file"),
    (
        "test_bad_input.py",
        "test_read_only_output_folder_is_refused_and_nothing_is_written",
        "Saving into a read-only folder",
    ),
    ("test_bad_input.py", "test_permission_denied_on_the_output_folder_is_refused", "Permission denied on the output"),
    ("test_bad_input.py", "test_permission_denied_for_a_single_file_is_refused", "Permission denied for one file"),
    ("test_bad_input.py", "test_damaged_generator_repo_on_the_hub_is_refused", "Damaged generator repo on the Hub"),
    (
        "test_bad_input.py",
        "test_bank_repo_with_a_changed_checkpoint_on_the_hub_is_refused",
        "Bank repo on the Hub with a changed checkpoint",
    ),
    (
        "test_bad_input.py",
        "test_legacy_bin_adapter_with_code_in_it_is_refused_without_running_it",
        "Legacy adapter_model.bin whose pickle runs code",
    ),
    (
        "test_bad_input.py",
        "test_generator_weights_with_a_flipped_bit_in_tensor_data_are_refused",
        "One flipped bit in the generator's tensor data",
    ),
    (
        "test_bad_input.py",
        "test_generated_adapter_with_a_flipped_bit_in_tensor_data_is_refused",
        "One flipped bit in a generated adapter's tensor data",
    ),
    (
        "test_reliability.py",
        "test_flipping_lora_alpha_in_a_generator_config_is_detected",
        "Generator config.json edited (lora_alpha 4 -> 5)",
    ),
    ("test_reliability.py", "test_editing_bank_json_is_detected", "bank.json edited"),
    (
        "test_reliability.py",
        "test_deleting_the_conditions_of_a_bank_is_a_clear_error_at_load",
        "conditions.safetensors deleted from a bank",
    ),
    ("test_reliability.py", "test_an_edited_adapter_config_is_detected", "Generated adapter's config edited"),
    (
        "test_reliability.py",
        "test_a_config_with_huge_sizes_is_refused_at_once",
        "Generator config.json with huge sizes",
    ),
    (
        "test_reliability.py",
        "test_a_checkpoint_beyond_the_range_of_the_bank_dtype_is_refused_when_added",
        "Checkpoint beyond the range of the bank's dtype",
    ),
    ("test_reliability.py", "test_bad_generation_arguments_are_named", "Bad generate_adapter argument"),
    ("test_reliability.py", "test_bad_tasks_and_weights_are_condition_errors", "Bad task or fusion weights"),
    ("test_reliability.py", "test_a_huge_temperature_is_blamed_not_the_weights", "Huge temperature"),
    ("test_reliability.py", "test_huge_conditions_are_blamed_not_the_weights", "Huge condition values"),
    (
        "test_reliability.py",
        "test_adapters_differing_only_in_training_settings_share_a_layout",
        "Adapters of another lora_alpha in one bank",
    ),
    ("test_reliability.py", "test_a_full_disk_is_a_not_writable_error_naming_the_free_space", "Full disk"),
    ("test_reliability.py", "test_a_file_given_as_a_generator_is_called_a_file", "A file given as a generator"),
    (
        "test_reliability.py",
        "test_a_missing_path_given_as_a_generator_is_called_a_missing_folder",
        "A missing path given as a generator",
    ),
]


def _function(module: ast.Module, name: str) -> ast.FunctionDef:
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"no test function {name} (renamed? update ROWS in tests/test_security_docs.py)")


def _cases(function: ast.FunctionDef) -> list[tuple[str, dict]]:
    """(case label, {parameter: ast value}) for each parametrized case; one unlabelled case when not parametrized."""
    axes = []
    for decorator in function.decorator_list:
        if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.parametrize"):
            continue
        names = [name.strip() for name in ast.literal_eval(decorator.args[0]).split(",")]
        values = decorator.args[1].elts
        ids = next((k.value for k in decorator.keywords if k.arg == "ids"), None)
        ids = [item.value for item in ids.elts] if isinstance(ids, (ast.List, ast.Tuple)) else None
        axis = []
        for index, value in enumerate(values):
            elements = value.elts if len(names) > 1 else [value]
            first = elements[0]
            if ids:
                label = ids[index]
            elif isinstance(first, ast.Constant) and isinstance(first.value, str):
                label = first.value.strip() or repr(first.value)  # a name of the case, or the text itself
            else:  # the first value names the case, unless it is a list that needs the rest to mean something
                label = ast.unparse(value if isinstance(first, (ast.List, ast.Tuple)) else first)
            label = label.encode("utf-8", "backslashreplace").decode()  # a lone surrogate is a case too
            axis.append((label if len(label) <= 60 else label[:57] + "...", dict(zip(names, elements))))
        axes.append(axis)
    cases = []
    for combination in itertools.product(*axes):
        label = ", ".join(part for part, _ in combination)
        cases.append((label, {key: value for _, binding in combination for key, value in binding.items()}))
    return cases or [("", {})]


def _strings(node, binding: dict) -> list[str]:
    """The literal strings an argument stands for (a constant, or a parameter bound to one or to a list of them)."""
    if isinstance(node, ast.Starred):
        node = node.value
    if isinstance(node, ast.Name) and node.id in binding:
        node = binding[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [item.value for item in node.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return []


def _row(function: ast.FunctionDef, binding: dict) -> tuple[list[str], list[str]]:
    """(error class names, what the message is asserted to say, as table text) of one case."""
    errors, said = [], []
    for node in ast.walk(function):
        if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
            errors.append(ast.unparse(node.type))  # try: ... except SomeError as error: assert ... in str(error)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and "str(error" in ast.unparse(node.comparators[0]):
            negated = "not " if isinstance(node.ops[0], ast.NotIn) else ""
            said += [f'{negated}"{_cell(text)}"' for text in _strings(node.left, binding)]
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        if called == "pytest.raises" and node.args:
            error = node.args[0]
            error = binding.get(error.id, error) if isinstance(error, ast.Name) else error
            errors.append(ast.unparse(error))
            said += [
                f"/{_cell(text)}/" for k in node.keywords if k.arg == "match" for text in _strings(k.value, binding)
            ]
        elif called == "assert_says":
            said += [f'"{_cell(text)}"' for argument in node.args[1:] for text in _strings(argument, binding)]
    return list(dict.fromkeys(errors)), list(dict.fromkeys(said))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def generate_table() -> str:
    """The markdown table, one row per case of the tests in ROWS."""
    lines = [
        "| bad input | error | the message says (asserted by the test) | test |",
        "|---|---|---|---|",
    ]
    modules = {}
    for file, name, what in ROWS:
        module = modules.setdefault(file, ast.parse((ROOT / "tests" / file).read_text()))
        function = _function(module, name)
        for label, binding in _cases(function):
            errors, said = _row(function, binding)
            assert errors, f"{name} asserts no error class with pytest.raises"
            said = ", ".join(said) or "(the error class only)"
            title = f"{what} (`{_cell(label)}`)" if label else what  # code: autorefs would read [a][b] as a link
            error_text = ", ".join(f"`{error}`" for error in errors)
            lines.append(f"| {title} | {error_text} | {said} | `{file}::{name}` |")
    return "\n".join(lines)


def _replace(text: str, table: str) -> str:
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def test_security_doc_table_is_the_generated_one():
    text = DOC.read_text()
    assert START in text and END in text, f"{DOC} lost its table markers"
    assert _replace(text, generate_table()) == text, (
        "docs/security.md's bad-input table is out of date: run `python -m tests.test_security_docs --write`"
    )


def test_every_refusal_test_of_test_bad_input_is_in_the_table():
    module = ast.parse((ROOT / "tests" / "test_bad_input.py").read_text())
    listed = {name for file, name, _ in ROWS if file == "test_bad_input.py"}
    refusing = {
        node.name
        for node in module.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and "pytest.raises" in ast.unparse(node)
    }
    skipped = {  # not one input: the class hierarchy, and what is left after a refusal
        "test_every_error_class_is_a_peft_cvae_error_and_a_builtin",
        "test_generator_refused_at_load_leaves_no_model_behind",
    }
    assert refusing - skipped - listed == set(), "add these tests to ROWS in tests/test_security_docs.py"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(_replace(DOC.read_text(), generate_table()))
        print(f"wrote the bad-input table of {DOC}")
    else:
        print(generate_table())
