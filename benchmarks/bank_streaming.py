"""The on-disk half of the scaling benchmark (issue 14): banks streamed from disk, measured in fresh processes.

Run through `python benchmarks/scaling.py --streaming` (results go into the same JSON and report). Three
measurements:

- **Peak RSS against bank size.** Banks of SmolLM2-135M r=16 all-linear checkpoints (4,884,480 numbers, 19.5 MB each)
  of growing size are written to disk one checkpoint at a time; a fresh process then opens the bank
  (`LoraBank.from_pretrained`), builds a generator (`PeftCVAEGenerator.from_bank`: one pass of statistics over every
  checkpoint, each file's hash checked on that first read) and runs the first training steps (`train_generator`,
  stopped after `--stream-steps` optimiser steps). Each stage's peak RSS (Linux `VmHWM`) is recorded; the target is
  <= 2 GB + 3 x one batch for any bank size. The generator is a small network (`GENERATOR`): the network's own cost
  is the main table's subject, this one is the bank's.
- **Data-loader wait.** During those steps, with `dataloader_num_workers=0` (every read blocks the step, the worst
  case), the seconds spent reading checkpoints against the seconds of the steps; and, for Llama-3-8B r=16 all-linear
  (41,943,040 numbers, 168 MB per checkpoint), the seconds to read one checkpoint (first read: hash and read; later
  reads: read only), to set against that layout's seconds per step.
- **Storage layout.** The same checkpoints as per-checkpoint safetensors files (the bank format) and as one 🤗
  `datasets` Arrow table (a fixed-length float32 list column, memory-mapped): bytes, write time, and time to read
  every checkpoint in random order.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scaling import LAYOUTS, Layout, _reset_peak_rss, _rss_mb, random_bank  # noqa: E402

STREAM_LAYOUT = LAYOUTS[1]  # SmolLM2-135M r=16 all-linear
READ_LAYOUT = LAYOUTS[3]  # Llama-3-8B r=16 all-linear
GENERATOR = {"hidden_channels": 32, "num_layers": 2, "latent_size": 16, "task_memory": False}  # as recorded


def write_bank(layout: Layout, num_checkpoints: int, num_tasks: int, folder: Path) -> int:
    """Write a bank of random checkpoints of `layout`, one checkpoint at a time (never all in memory): a bank of one
    checkpoint per task saved by `LoraBank.save_pretrained`, then more checkpoint files and manifest entries, then the
    integrity record written again over all of them. Returns the bank's bytes."""
    from peft_cvae.file_utils import read_json, write_json, write_safetensors
    from peft_cvae.integrity import write_integrity_record

    bank, checkpoint = random_bank(layout, None, num_tasks, per_task=1)
    bank.save_pretrained(folder)
    del bank
    manifest = read_json(folder / "bank.json")
    for index in range(num_tasks, num_checkpoints):
        file = f"checkpoints/{index:05d}.safetensors"
        write_safetensors(checkpoint(), folder / file)
        manifest["checkpoints"].append({"task": f"task{index % num_tasks}", "step": index // num_tasks, "file": file})
    write_json(manifest, folder / "bank.json")
    write_integrity_record(folder)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---- workers (each in a fresh process) ----------------------------------------------------------------------------
class _Stop(Exception):
    """Raised from the optimiser's step hook once the measured steps are done."""


def stream_worker(folder: Path, steps: int, batch_size: int, threads: int) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import peft_cvae.training
    from peft_cvae import LoraBank, PeftCVAEGenerator, train_generator
    from peft_cvae.bank_dataset import BankDataset

    torch.set_num_threads(threads)
    record = {"baseline_rss_mb": _rss_mb("VmRSS")}
    _reset_peak_rss()
    start = time.perf_counter()
    bank = LoraBank.from_pretrained(folder)
    record.update(open_seconds=time.perf_counter() - start, open_peak_rss_mb=_rss_mb("VmHWM"))

    _reset_peak_rss()
    start = time.perf_counter()
    generator = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    record.update(from_bank_seconds=time.perf_counter() - start, from_bank_peak_rss_mb=_rss_mb("VmHWM"))

    reading = {"seconds": 0.0}
    times = []

    class TimedDataset(BankDataset):  # num_workers=0: every read happens in this process, between steps
        def __getitem__(self, index):
            start = time.perf_counter()
            item = super().__getitem__(index)
            reading["seconds"] += time.perf_counter() - start
            return item

    def count_step(optimizer, args, kwargs):
        times.append(time.perf_counter())
        if len(times) > steps:  # the first step's time counts from the loop's start: steps + 1 marks
            raise _Stop

    peft_cvae.training.BankDataset = TimedDataset
    hook = register_optimizer_step_post_hook(count_step)
    _reset_peak_rss()
    times.append(time.perf_counter())
    try:
        train_generator(generator, bank, epochs=1000, batch_size=batch_size, show_progress=False)
    except _Stop:
        pass
    finally:
        hook.remove()
        peft_cvae.training.BankDataset = BankDataset
    record.update(
        train_peak_rss_mb=_rss_mb("VmHWM"),
        train_steps=len(times) - 1,
        seconds_per_step=(times[-1] - times[0]) / (len(times) - 1),
        read_seconds=reading["seconds"],
        data_wait_share=reading["seconds"] / (times[-1] - times[0]),
    )
    return record


def read_worker(folder: Path, threads: int) -> dict:
    """Seconds to read one checkpoint's flat vector: first read (hash + read) and later reads (read only)."""
    import torch

    from peft_cvae import LoraBank

    torch.set_num_threads(threads)
    bank = LoraBank.from_pretrained(folder)
    first, later = [], []
    for index in range(len(bank)):
        start = time.perf_counter()
        bank.vector(index)
        first.append(time.perf_counter() - start)
    for index in range(len(bank)):
        start = time.perf_counter()
        bank.vector(index)
        later.append(time.perf_counter() - start)
    return {"first_read_seconds": sorted(first)[len(first) // 2], "read_seconds": sorted(later)[len(later) // 2]}


def storage_worker(folder: Path, scratch: Path, threads: int) -> dict:
    """The bank's checkpoints as safetensors files (as saved) and as a datasets Arrow table: size and read times."""
    import datasets
    import torch

    from peft_cvae import LoraBank

    torch.set_num_threads(threads)
    bank = LoraBank.from_pretrained(folder)
    numel = bank.layout.numel
    order = list(range(len(bank)))
    random.Random(0).shuffle(order)
    record = {"num_checkpoints": len(bank), "numel": numel}
    record["safetensors_bytes"] = sum(path.stat().st_size for path in (folder / "checkpoints").iterdir())
    start = time.perf_counter()
    for index in order:
        bank.vector(index)  # first read: hash + read
    record["safetensors_first_read_seconds"] = (time.perf_counter() - start) / len(bank)
    start = time.perf_counter()
    for index in order:
        bank.vector(index)
    record["safetensors_read_seconds"] = (time.perf_counter() - start) / len(bank)

    features = datasets.Features(
        {
            "task": datasets.Value("string"),
            "vector": datasets.Sequence(datasets.Value("float32"), length=numel),
        }
    )

    def rows():
        for index, checkpoint in enumerate(bank.checkpoints):
            yield {"task": checkpoint.task, "vector": bank.vector(index).numpy()}

    start = time.perf_counter()
    table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(scratch / "arrow-cache"))
    record["arrow_write_seconds"] = time.perf_counter() - start
    record["arrow_bytes"] = sum(
        file["filename"] and Path(file["filename"]).stat().st_size for file in table.cache_files
    )
    table = table.with_format("torch")
    start = time.perf_counter()
    for index in order:
        vector = table[index]["vector"]
    record["arrow_read_seconds"] = (time.perf_counter() - start) / len(bank)
    assert torch.equal(vector, bank.vector(order[-1]))
    return record


# ---- the driver (called by scaling.py) ----------------------------------------------------------------------------
def _run(*arguments: str) -> dict:
    command = [sys.executable, __file__, *arguments]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_streaming(args, previous: dict | None = None) -> dict:
    """The streaming measurements named in `args.stream_parts` ("banks", "storage", "read"), updating `previous` (the
    saved results) with them; banks are written under `args.scratch` (default: the temp folder), deleted after use."""
    results = {
        **(previous or {}),
        "layout": STREAM_LAYOUT.label,
        "numel": STREAM_LAYOUT.numel(),
        "generator": GENERATOR,
    }
    threads = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="peft-cvae-streaming-", dir=args.scratch) as scratch:
        scratch = Path(scratch)
        if "banks" in args.stream_parts:
            results["banks"] = []
            for count in args.stream_checkpoints:
                folder = scratch / f"bank-{count}"
                start = time.perf_counter()
                bank_bytes = write_bank(STREAM_LAYOUT, count, args.stream_tasks, folder)
                seconds = time.perf_counter() - start
                print(f"wrote a bank of {count} checkpoints ({bank_bytes / 1e9:.1f} GB): {seconds:.0f} s")
                record = _run("--worker", "stream", str(folder), str(args.stream_steps), str(args.batch_size), threads)
                batch_bytes = 4 * STREAM_LAYOUT.numel() * args.batch_size
                record.update(
                    num_checkpoints=count, bank_bytes=bank_bytes, batch_bytes=batch_bytes, threads=args.threads
                )
                shutil.rmtree(folder)
                results["banks"].append(record)
                print(json.dumps(record))
        if "storage" in args.stream_parts:
            folder = scratch / "storage"
            write_bank(STREAM_LAYOUT, args.storage_checkpoints, 2, folder)
            results["storage"] = {
                **_run("--worker", "storage", str(folder), str(scratch), threads),
                "threads": args.threads,
            }
            shutil.rmtree(folder)
            print(json.dumps(results["storage"]))
        if "read" in args.stream_parts:
            folder = scratch / "read"
            write_bank(READ_LAYOUT, 3, 1, folder)
            record = _run("--worker", "read", str(folder), threads)
            results["read"] = {
                "layout": READ_LAYOUT.label,
                "numel": READ_LAYOUT.numel(),
                **record,
                "threads": args.threads,
            }
            print(json.dumps(results["read"]))
    return results


def _gb(megabytes: float) -> str:
    return f"{megabytes / 1024:.2f} GB"


def _share(read_seconds: float, step_seconds: float, batch: int = 2) -> str:
    return f"{100 * batch * read_seconds / (batch * read_seconds + step_seconds):.1f} %"


def report_section(results: dict, layouts: list[dict]) -> str:
    """The markdown of the streaming measurements (generated into docs/benchmarks_scaling.md by scaling.py)."""
    rows = []
    for record in results["banks"]:
        peak = max(record[key] for key in ("open_peak_rss_mb", "from_bank_peak_rss_mb", "train_peak_rss_mb"))
        target = 2048 + 3 * record["batch_bytes"] / 2**20
        cells = [
            f"{record['bank_bytes'] / 1e9:.2f} GB ({record['num_checkpoints']} ckpts)",
            f"{_gb(record['open_peak_rss_mb'])} ({record['open_seconds']:.1f} s)",
            f"{_gb(record['from_bank_peak_rss_mb'])} ({record['from_bank_seconds']:.0f} s)",
            _gb(record["train_peak_rss_mb"]),
            _gb(peak),
            _gb(target),
            "yes" if peak <= target else "NO",
            f"{record['seconds_per_step']:.2f} s",
            f"{100 * record['data_wait_share']:.1f} %",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    storage_text = ""
    if results.get("storage"):
        storage = results["storage"]
        count = storage["num_checkpoints"]
        first, later = storage["safetensors_first_read_seconds"], storage["safetensors_read_seconds"]
        storage_text = f"""
### Storage: per-checkpoint safetensors files or one Arrow table

{count} checkpoints of {storage["numel"]:,} numbers ({storage["safetensors_bytes"] / count / 1e6:.1f} MB each), each
read once in a random order (warm page cache: the files were just written).

| layout | bytes | write | read one checkpoint |
|---|---|---|---|
| safetensors, one file per checkpoint (the bank format) | {storage["safetensors_bytes"] / 1e6:,.0f} MB | as saved | \
{1e3 * first:.0f} ms on the first read (sha256 checked), {1e3 * later:.0f} ms later |
| 🤗 datasets Arrow table, fixed-length float32 list | {storage["arrow_bytes"] / 1e6:,.0f} MB | \
{storage["arrow_write_seconds"]:.1f} s | {1e3 * storage["arrow_read_seconds"]:.0f} ms |
"""
    read_text = ""
    if results.get("read"):
        read = results["read"]
        full = next((r for r in layouts if r.get("label") == read["layout"]), None)
        share = ""
        if full is not None:
            step = full["seconds_per_step"] * full["full_numel"] / full["numel"]
            share = (
                f" Against that layout's {step:.1f} s per training step (main table), reading a batch of 2 checkpoints"
                f" in the training process takes {_share(read['read_seconds'], step)} of the step"
                f" ({_share(read['first_read_seconds'], step)} in the first epoch, with the hash)."
            )
        read_text = (
            f"\nReading one {read['layout']} checkpoint ({read['numel']:,} numbers, {4 * read['numel'] / 1e6:.0f} MB):"
            f" {read['first_read_seconds']:.2f} s on its first read (sha256 and read), {read['read_seconds']:.2f} s"
            f" later (median of 3).{share}\n"
        )
    batch = results["banks"][0]["batch_bytes"] // (4 * results["numel"]) if results["banks"] else "-"
    return f"""
## Banks streamed from disk

`python benchmarks/scaling.py --streaming`: banks of {results["layout"]} checkpoints ({results["numel"]:,} numbers)
on disk, each opened in a fresh process that builds a generator ({results["generator"]}) and runs the first
{results.get("settings", {}).get("stream_steps", "")} training steps at batch {batch} with `dataloader_num_workers=0`.
Peak RSS of each stage is the whole process's (`VmHWM`: Python and torch included); *target* is 2 GB + 3 x one batch;
*data wait* is the share of the step time spent reading checkpoints (without workers every read blocks the step).

| bank on disk | open bank | from_bank | first training steps | peak | target | met | s / step | data wait |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{read_text}{storage_text}"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["stream", "read", "storage"], required=True)
    parser.add_argument("arguments", nargs="*")
    args = parser.parse_args(argv)
    if args.worker == "stream":
        folder, steps, batch_size, threads = args.arguments
        record = stream_worker(Path(folder), int(steps), int(batch_size), int(threads))
    elif args.worker == "read":
        record = read_worker(Path(args.arguments[0]), int(args.arguments[1]))
    else:
        record = storage_worker(Path(args.arguments[0]), Path(args.arguments[1]), int(args.arguments[2]))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
