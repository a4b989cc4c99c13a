"""Atomic writes: a crash in the middle of a save leaves the previous version intact and loadable.

Every save (generator, generated adapter, bank, and the `write_json`/`write_safetensors` helpers under them) writes to
a temporary path next to the destination (`.<name>.tmp-*`) and renames into place. The crashes are simulated by
patching the real writers (safetensors' `save_file`, `open`, `os.replace`) to write part of a file and then raise, and
once by SIGKILL-ing a saving process. After each crash the previous version must load and equal what was saved, and
no temporary file may be left behind (after SIGKILL the leftover is a clearly named hidden folder beside the
destination, which the loaders never look at).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from peft import PeftModel

from peft_cvae import LoraBank, PeftCVAEGenerator, file_utils
from peft_cvae.file_utils import atomic_directory, read_json, read_safetensors, write_json, write_safetensors
from peft_cvae.testing_utils import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


class SimulatedCrash(RuntimeError):
    """Raised by the patched writers in place of a power cut."""


def partial_save_file(tensors, filename, metadata=None):
    """safetensors' save_file that writes the first half of the file and then 'crashes'."""
    safetensors.torch.save_file(tensors, filename, metadata=metadata)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])
    raise SimulatedCrash(f"crash while writing {filename}")


def failing_replace_on_call(monkeypatch, failing_call: int, into: Path | None = None):
    """Make the `failing_call`-th os.replace raise (after the earlier ones succeeded); later calls work again.
    With `into`, only moves into that folder count. Returns the (source, target) of the counted calls up to the
    failing one."""
    real_replace = os.replace
    calls = []

    def replace(source, target, *args, **kwargs):
        counted = into is None or Path(target).parent == into
        if counted and len(calls) < failing_call:  # record up to the failing call, not the rollback after it
            calls.append((source, target))
        if len(calls) == failing_call and not getattr(replace, "failed", False):
            replace.failed = True
            raise SimulatedCrash(f"crash while moving {source} to {target}")
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders the writers may have left in `folder` (recursively)."""
    return sorted(str(path) for path in folder.rglob("*") if ".tmp-" in path.name or ".previous" in path.parts)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---- write_json / write_safetensors -------------------------------------------------------------------------------
def test_write_json_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "data.json"
    write_json({"version": 1}, path)
    real_open = open

    class HalfWrittenFile:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def close(self):
            self.file.close()

        def write(self, text):
            self.file.write(text[: len(text) // 2])
            raise SimulatedCrash("disk full")

    monkeypatch.setattr(file_utils, "open", lambda *a, **k: HalfWrittenFile(real_open(*a, **k)), raising=False)
    with pytest.raises(SimulatedCrash):
        write_json({"version": 2, "payload": "x" * 1000}, path)
    monkeypatch.undo()
    assert read_json(path) == {"version": 1}
    assert leftovers(tmp_path) == []


def test_write_json_crash_at_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "data.json"
    write_json({"version": 1}, path)
    failing_replace_on_call(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        write_json({"version": 2}, path)
    monkeypatch.undo()
    assert read_json(path) == {"version": 1}
    assert leftovers(tmp_path) == []
    write_json({"version": 2}, path)  # and the next save works
    assert read_json(path) == {"version": 2}


def test_write_json_refuses_non_json_data_before_touching_the_file(tmp_path):
    path = tmp_path / "data.json"
    write_json({"version": 1}, path)
    with pytest.raises(TypeError):
        write_json({"tensor": torch.ones(2)}, path)
    assert read_json(path) == {"version": 1} and leftovers(tmp_path) == []


def test_write_safetensors_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    write_safetensors({"a": torch.arange(6.0)}, path)
    monkeypatch.setattr(file_utils, "save_file", partial_save_file)
    with pytest.raises(SimulatedCrash):
        write_safetensors({"a": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.equal(read_safetensors(path)["a"], torch.arange(6.0))
    assert leftovers(tmp_path) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    """A saved file is as readable as any other new file (safetensors and mkstemp alone would make it 0600)."""
    write_json({"a": 1}, tmp_path / "a.json")
    write_safetensors({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    (tmp_path / "reference").write_text("x")
    reference = (tmp_path / "reference").stat().st_mode & 0o777
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == reference
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == reference


def test_saved_generator_files_get_ordinary_permissions(trained_generator, tmp_path):
    """transformers writes model.safetensors through safetensors (0600); the saved folder is uniform."""
    (tmp_path / "reference").write_text("x")
    reference = (tmp_path / "reference").stat().st_mode & 0o777
    trained_generator.save_pretrained(tmp_path / "generator")
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "generator").iterdir()}
    assert modes == dict.fromkeys(
        ["README.md", "config.json", "model.safetensors", "peft_cvae_integrity.json"], reference
    )


# ---- atomic_directory ---------------------------------------------------------------------------------------------
def write_version(folder: Path, version: int) -> None:
    write_json({"version": version}, folder / "config.json")
    write_safetensors({"w": torch.full((4,), float(version))}, folder / "weights.safetensors")
    (folder / "sub").mkdir(exist_ok=True)
    write_json({"version": version}, folder / "sub" / "extra.json")


def test_atomic_directory_crash_in_the_writer_changes_nothing(tmp_path):
    destination = tmp_path / "out"
    with atomic_directory(destination) as staging:
        write_version(staging, 1)
    (destination / "README.md").write_text("kept")
    before = snapshot(destination)
    with pytest.raises(SimulatedCrash):
        with atomic_directory(destination) as staging:
            write_json({"version": 2}, staging / "config.json")
            raise SimulatedCrash("crash after one file")
    assert snapshot(destination) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_atomic_directory_crash_while_moving_files_rolls_back(tmp_path, monkeypatch, failing_call):
    """Files are moved one by one; if the k-th move fails, the k-1 already moved are put back."""
    destination = tmp_path / "out"
    with atomic_directory(destination) as staging:
        write_version(staging, 1)
    (destination / "README.md").write_text("kept")
    before = snapshot(destination)
    with atomic_directory(tmp_path / "scratch") as staging:  # count the moves of one save
        write_version(staging, 2)
    calls = failing_replace_on_call(monkeypatch, 10**9)
    with atomic_directory(tmp_path / "scratch") as staging:
        write_version(staging, 2)
    moves_per_save = len(calls)
    assert moves_per_save >= 3 + 3  # 3 temporary files renamed in staging, 3 moved into place

    calls = failing_replace_on_call(monkeypatch, moves_per_save - 3 + failing_call)
    with pytest.raises(SimulatedCrash):
        with atomic_directory(destination) as staging:
            write_version(staging, 2)
    monkeypatch.undo()
    assert snapshot(destination) == before
    assert leftovers(tmp_path) == []


def test_atomic_directory_crash_into_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(file_utils, "save_file", partial_save_file)
    with pytest.raises(SimulatedCrash):
        with atomic_directory(tmp_path / "new" / "deeper" / "out") as staging:
            write_version(staging, 1)
    assert list(tmp_path.iterdir()) == []


# ---- package savers -----------------------------------------------------------------------------------------------
def assert_adapter_folder_is(folder: Path, adapter) -> None:
    """The folder loads into PEFT with no missing or unexpected key and holds exactly `adapter`'s tensors."""
    peft_model = PeftModel.from_pretrained(tiny_llama(), folder, adapter_name="first")
    result = peft_model.load_adapter(folder, adapter_name="check")
    assert result.missing_keys == [] and result.unexpected_keys == []
    saved = read_safetensors(folder / "adapter_model.safetensors")
    assert sorted(saved) == sorted(adapter.state_dict)
    assert all(torch.equal(saved[key], adapter.state_dict[key]) for key in saved)


@pytest.mark.parametrize("crash", ["weights", "rename"])
def test_adapter_save_crash_keeps_the_previous_adapter(trained_generator, tmp_path, monkeypatch, crash):
    first = trained_generator.generate_adapter("ascending", seed=0)
    second = trained_generator.generate_adapter("descending", seed=1)
    first.save_pretrained(tmp_path / "adapter")
    if crash == "weights":
        monkeypatch.setattr(file_utils, "save_file", partial_save_file)
    else:
        calls = failing_replace_on_call(monkeypatch, 2, into=tmp_path / "adapter")  # the second move into place
    with pytest.raises(SimulatedCrash):
        second.save_pretrained(tmp_path / "adapter")
    monkeypatch.undo()
    if crash == "rename":  # the crash hit a move into the destination, after another file had been moved
        assert [Path(target).parent for _, target in calls] == [tmp_path / "adapter"] * 2
    assert_adapter_folder_is(tmp_path / "adapter", first)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("crash", ["checkpoint", "manifest", "rename"])
def test_bank_save_crash_keeps_the_previous_bank(bank, tmp_path, monkeypatch, crash):
    bank.save_pretrained(tmp_path / "bank")
    smaller = LoraBank(bank.layout)
    for checkpoint in bank.checkpoints[:2]:
        smaller.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    smaller.set_condition(bank.task_names[0], torch.zeros(8))
    before = snapshot(tmp_path / "bank")
    if crash == "checkpoint":
        monkeypatch.setattr(file_utils, "save_file", partial_save_file)
    elif crash == "manifest":
        monkeypatch.setattr(file_utils.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(SimulatedCrash("json")))
    else:
        calls = failing_replace_on_call(monkeypatch, 7)  # 4 temp-file renames in staging, then the third move
    with pytest.raises(SimulatedCrash):
        smaller.save_pretrained(tmp_path / "bank")
    monkeypatch.undo()
    if crash == "rename":
        assert (tmp_path / "bank") in Path(calls[-1][1]).parents and (tmp_path / "bank") in Path(calls[-2][1]).parents
    assert snapshot(tmp_path / "bank") == before
    loaded = LoraBank.from_pretrained(tmp_path / "bank")
    assert torch.equal(loaded.vectors(), bank.vectors()) and loaded.task_names == bank.task_names
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("crash", ["weights", "rename"])
def test_generator_save_crash_keeps_the_previous_generator(trained_generator, bank, tmp_path, monkeypatch, crash):
    trained_generator.save_pretrained(tmp_path / "generator")
    before = snapshot(tmp_path / "generator")
    assert {"config.json", "model.safetensors"} <= set(before)
    other = PeftCVAEGenerator.from_bank(bank, patch_size=16, hidden_channels=32, latent_size=8, num_layers=2)
    if crash == "weights":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", partial_save_file)
    else:
        calls = failing_replace_on_call(monkeypatch, 2, into=tmp_path / "generator")  # the second file moved in
    with pytest.raises(SimulatedCrash):
        other.save_pretrained(tmp_path / "generator")
    monkeypatch.undo()
    if crash == "rename":
        assert [Path(target).parent for _, target in calls] == [tmp_path / "generator"] * 2
    assert snapshot(tmp_path / "generator") == before
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    for name, tensor in trained_generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert leftovers(tmp_path) == []


# ---- a real kill ----------------------------------------------------------------------------------------------------
KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import peft_cvae.file_utils as file_utils
    from peft_cvae import LoraBank

    real_save_file = file_utils.save_file
    def slow_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        print("WRITING", flush=True)
        time.sleep(60)  # killed here, with part of the new version written
    file_utils.save_file = slow_save_file
    bank = LoraBank.from_pretrained(sys.argv[1])
    bank.checkpoints = bank.checkpoints[:3]
    bank.save_pretrained(sys.argv[1])
    """
)


def test_sigkill_mid_save_leaves_the_previous_bank_and_a_clearly_named_leftover(bank, tmp_path):
    bank.save_pretrained(tmp_path / "bank")
    before = snapshot(tmp_path / "bank")
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "bank")], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert process.stdout.readline().strip() == "WRITING"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert snapshot(tmp_path / "bank") == before
    leftover = [path.name for path in tmp_path.iterdir() if path.name.startswith(".bank.tmp-")]
    assert len(leftover) == 1, list(tmp_path.iterdir())  # the staging folder, hidden and named after its target
    loaded = LoraBank.from_pretrained(tmp_path / "bank")
    assert torch.equal(loaded.vectors(), bank.vectors())
    manifest = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert len(manifest["checkpoints"]) == len(bank) == 12


def test_saving_into_a_writable_folder_whose_parent_is_read_only_works(trained_generator, tmp_path, monkeypatch):
    """The staging folder goes beside the destination, or inside it when the parent refuses (simulated, so it also
    runs as root); the save is as complete and as clean either way."""
    destination = tmp_path / "shared" / "mine"
    destination.mkdir(parents=True)
    real_mkdtemp = file_utils.tempfile.mkdtemp

    def parent_refuses(*args, dir=None, **kwargs):
        if Path(dir) == destination.parent:
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(file_utils.tempfile, "mkdtemp", parent_refuses)
    adapter = trained_generator.generate_adapter("ascending", seed=0)
    adapter.save_pretrained(destination)
    trained_generator.save_pretrained(destination / "generator")  # a new folder inside: its parent is writable
    monkeypatch.undo()
    assert sorted(path.name for path in destination.iterdir()) == [
        "README.md",  # the adapter's PEFT-style card, written by save_pretrained
        "adapter_config.json",
        "adapter_model.safetensors",
        "generator",
        "peft_cvae_integrity.json",
    ]
    assert_adapter_folder_is(destination, adapter)
    assert leftovers(tmp_path) == []
