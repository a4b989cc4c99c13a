"""Smoke test of benchmarks/scaling.py: one tiny layout measured in-process, and the report rendered from it."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scaling  # noqa: E402


def test_worker_measures_a_tiny_layout(tmp_path, monkeypatch):
    layout = scaling.Layout("tiny", scaling.ModelShape("tiny", num_layers=2, hidden=16, kv=8, intermediate=32), 2,
                            scaling.ALL_LINEAR)  # fmt: skip
    assert layout.numel() == sum(a * b for a, b in layout.state_dict_shapes().values())
    args = argparse.Namespace(tasks=2, checkpoints_per_task=2, batch_size=2, train_steps=2, threads=1)
    record = scaling.worker(layout, None, args)
    assert record["numel"] == layout.numel() and record["num_checkpoints"] == 4
    assert record["bank_bytes"] > 4 * 4 * layout.numel()  # four fp32 checkpoints, plus headers and manifest
    assert record["saved_bytes_batch2"] > record["saved_bytes_batch1"] > 0
    assert record["activation_bytes_per_number_per_sample"] > 0
    assert record["seconds_per_step"] > 0 and record["generate_seconds"] > 0
    assert record["train_peak_rss_mb"] >= record["baseline_rss_mb"]

    record.update(label="tiny", full_numel=layout.numel(), scaled=False)
    results = {"settings": {"tasks": 2, "checkpoints_per_task": 2, "batch_size": 2, "threads": 1}, "layouts": [record]}
    monkeypatch.setattr(scaling, "REPORT", tmp_path / "report.md")
    scaling.write_report(results)
    assert "| tiny | " in (tmp_path / "report.md").read_text()


def test_streaming_measures_a_bank_written_to_disk_and_renders_its_report(tmp_path):
    from benchmarks import bank_streaming
    from peft_cvae import LoraBank

    layout = scaling.Layout("tiny", scaling.ModelShape("tiny", num_layers=2, hidden=64, kv=32, intermediate=128), 4,
                            scaling.ALL_LINEAR)  # fmt: skip
    bank_bytes = bank_streaming.write_bank(layout, 6, 2, tmp_path / "bank")
    bank = LoraBank.from_pretrained(tmp_path / "bank", verify=True)  # written one checkpoint at a time, still whole
    assert len(bank) == 6 and bank.task_names == ["task0", "task1"] and bank.layout.numel == layout.numel()
    record = bank_streaming.stream_worker(tmp_path / "bank", steps=2, batch_size=2, threads=1)
    assert record["train_steps"] == 2 and record["seconds_per_step"] > 0 and 0 < record["data_wait_share"] < 1
    assert record["train_peak_rss_mb"] > 0 and record["from_bank_peak_rss_mb"] > 0
    record.update(num_checkpoints=6, bank_bytes=bank_bytes, batch_bytes=8 * layout.numel())
    results = {"layout": "tiny", "numel": layout.numel(), "generator": {}, "banks": [record]}
    text = bank_streaming.report_section(results, [])
    assert "## Banks streamed from disk" in text and "| yes |" in text


def test_worker_measures_the_factorised_generator():
    layout = scaling.Layout("tiny", scaling.ModelShape("tiny", num_layers=2, hidden=16, kv=8, intermediate=32), 2,
                            scaling.ALL_LINEAR)  # fmt: skip
    args = argparse.Namespace(
        tasks=2, checkpoints_per_task=2, batch_size=2, train_steps=2, threads=1, architecture="factorised"
    )
    record = scaling.worker(layout, None, args)
    assert record["activation_bytes_per_number_per_sample"] > 0 and record["generate_seconds"] > 0
    conv = scaling.worker(layout, None, argparse.Namespace(**{**vars(args), "architecture": "conv"}))
    assert record["generator_parameters"] != conv["generator_parameters"]  # the option reached from_bank
