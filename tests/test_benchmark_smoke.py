"""Smoke run of benchmarks/lora_generation.py on the tiny preset (tiny Llama, synthetic domains): every section of
the report is produced, every score is a finite perplexity, the cache makes a rerun skip all training and scoring."""

import importlib.util
import json
import math
from pathlib import Path

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "lora_generation.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("lora_generation", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_tiny_preset_writes_complete_finite_results(tmp_path):
    benchmark = _load_benchmark()
    arguments = ["--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    benchmark.main(arguments)

    results = json.loads((tmp_path / "out" / "lora_generation_tiny.json").read_text())
    assert set(results["seen"]) == {"ascending", "descending", "repeating"}
    expected = {"base", "original LoRA", "own checkpoint mean", "model soup", "TIES merge", "nearest checkpoint"}
    for kind in ("description", "examples"):
        expected |= {f"generated ({kind}, mean)", f"generated ({kind}, best of 2)", f"shuffled condition ({kind})"}
    for methods in results["seen"].values():
        assert expected <= set(methods)
        assert all(math.isfinite(m["perplexity"]) and m["perplexity"] > 1 for m in methods.values())
        assert methods["original LoRA"]["perplexity"] < methods["base"]["perplexity"]  # the LoRAs learned
    for kind in ("description", "examples"):
        for distances in results["distances"][kind].values():
            assert distances["generated_to_nearest_checkpoint"] >= 0 and distances["own_checkpoint_spread_mean"] > 0

    unseen = results["unseen"]["repeating"]
    assert {"generated from description", "generated from examples", "model soup of the other domains"} <= set(unseen)
    assert all(math.isfinite(m["recovered"]) for m in unseen.values())

    pair = results["fusion"]["pairs"]["ascending+descending"]
    assert {"generated, combine=condition", "generated, combine=parameters", "PEFT linear merge"} <= set(pair)
    assert all(set(scores) == {"ascending", "descending"} for scores in pair.values())

    cost = results["cost"]
    assert 0 < cost["generator_bytes"] and 0 < cost["bank_bytes"]
    assert cost["description_to_files_seconds_median"] > 0 and cost["peft_load_adapter_seconds_median"] > 0
    assert all(row["status"] in ("PASS", "MISS") for row in results["targets"])
    assert results["training"]["description"]["final_loss"] < results["training"]["description"]["first_loss"]

    report = (tmp_path / "out" / "lora_generation_tiny.md").read_text()
    assert report.startswith("# Benchmark") and "## Targets" in report and "## Fusion" in report
    for plot in ("perplexity", "task_vectors", "loras"):
        assert (tmp_path / "out" / f"lora_generation_tiny_{plot}.png").stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*tmp-*"))

    # A rerun finds everything in the cache: same numbers, no generator trained again.
    before = sorted(path.name for path in (tmp_path / "cache").iterdir())
    again = benchmark.main(arguments)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == before
    assert again["seen"] == results["seen"]

    # The design comparison table of the full reports reads each design's saved results.
    history_dir = tmp_path / "history"
    history_dir.mkdir()
    for preset in ("full-cpu", "full-cpu-memory"):
        (history_dir / f"lora_generation_{preset}.json").write_text(json.dumps(results))
    table = benchmark.design_history(history_dir).splitlines()
    assert table[0] == "| | [`full-cpu`](benchmarks_full_cpu.md) | [`full-cpu-memory`](benchmarks_task_memory.md) |"
    seen = results["seen"].values()
    ratios = [m["own checkpoint mean"]["perplexity"] / m["original LoRA"]["perplexity"] for m in seen]
    row = next(line for line in table if line.startswith("| seen: own-checkpoint mean / original PPL |"))
    assert row.count(f"{min(ratios):.4f}-{max(ratios):.4f}") == 2  # one cell per design
    assert any(line.startswith("| unseen (desc)") and "repeating" in line for line in table)
    assert benchmark.design_history(tmp_path / "cache") is None  # no saved results: no table
