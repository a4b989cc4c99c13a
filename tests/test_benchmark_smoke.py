"""Smoke run of benchmarks/lora_generation.py on the tiny preset (tiny Llama, synthetic domains)."""

import importlib.util
import json
import math
from pathlib import Path

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "lora_generation.py"


def test_benchmark_tiny_preset_writes_complete_finite_results(tmp_path):
    spec = importlib.util.spec_from_file_location("lora_generation", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")])

    results = json.loads((tmp_path / "out" / "lora_generation_tiny.json").read_text())
    assert set(results["seen"]) == {"ascending", "descending", "repeating"}
    for methods in results["seen"].values():
        assert {"base", "original LoRA", "generated (mean)", "model soup", "TIES merge", "shuffled condition"} <= set(
            methods
        )
        assert all(math.isfinite(m["perplexity"]) and m["perplexity"] > 1 for m in methods.values())
    assert "repeating" in results["unseen"]
    assert results["cost"]["generator_bytes"] > 0 and results["cost"]["final_loss"] < results["cost"]["first_loss"]
    assert (tmp_path / "out" / "lora_generation_tiny.md").read_text().startswith("# Benchmark")
    assert not list((tmp_path / "out").glob(".*tmp-*"))
