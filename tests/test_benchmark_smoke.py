"""Smoke run of benchmarks/lora_generation.py on the tiny preset (tiny Llama, synthetic domains): every section of
the report is produced, every score is a finite perplexity, the cache makes a rerun skip all training and scoring.
Also the helpers every benchmark shares (benchmarks.caching, benchmarks.reporting)."""

import json
import math
import statistics

import pytest

from benchmarks import generator_sweep, lora_generation
from benchmarks.caching import cache_key, cached_directory, cached_json
from benchmarks.lora.report import design_history, same_cache_comparison
from benchmarks.reporting import bootstrap_interval, markdown_table, publish_report


def test_benchmark_tiny_preset_writes_complete_finite_results(tmp_path):
    arguments = ["--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    lora_generation.main(arguments)

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
    again = lora_generation.main(arguments)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == before
    assert again["seen"] == results["seen"]

    # The design comparison table of the full reports reads each design's saved results.
    history_dir = tmp_path / "history"
    history_dir.mkdir()
    for preset in ("full-cpu", "full-cpu-memory"):
        (history_dir / f"lora_generation_{preset}.json").write_text(json.dumps(results))
    table = design_history(history_dir).splitlines()
    assert table[0] == "| | [`full-cpu`](benchmarks_full_cpu.md) | [`full-cpu-memory`](benchmarks_task_memory.md) |"
    seen = results["seen"].values()
    ratios = [m["own checkpoint mean"]["perplexity"] / m["original LoRA"]["perplexity"] for m in seen]
    row = next(line for line in table if line.startswith("| seen: own-checkpoint mean / original PPL |"))
    assert row.count(f"{min(ratios):.4f}-{max(ratios):.4f}") == 2  # one cell per design

    # A run against a control on the same cache: one row per held-out domain, each kind's control and own cells.
    control = json.loads(json.dumps(results))
    control["unseen"]["repeating"]["generated from description"]["perplexity"] = 99.0
    lines = same_cache_comparison(results, control, "control.json").splitlines()
    row = next(line for line in lines if line.startswith("| repeating |")).split(" | ")
    own = unseen["generated from description"]
    assert row[1].startswith("99.00") and row[2] == f"{own['perplexity']:.2f} ({own['recovered']:.0%})"
    assert len([line for line in lines if line.startswith("| ") and "held-out" not in line]) == len(results["unseen"])
    assert any(line.startswith("| unseen (desc)") and "repeating" in line for line in table)
    assert design_history(tmp_path / "cache") is None  # no saved results: no table

    # The design-lever sweep reuses the preset's cached bank and task vectors (it imports the benchmark by name).
    rows = generator_sweep.main([*arguments, "--variants", "preset", "--recon-only"])
    assert rows[0]["variant"] == "preset" and set(rows[0]["domains"]) == set(results["seen"])
    assert (tmp_path / "out" / "generator_sweep_tiny.md").read_text().count("| preset |") == 1


def test_cache_key_names_exactly_what_determines_a_step():
    assert cache_key({"lr": 1e-3, "steps": 40}, "sport") == cache_key({"steps": 40, "lr": 1e-3}, "sport")  # order-free
    assert cache_key({"lr": 1e-3, "steps": 40}, "sport") != cache_key({"lr": 1e-3, "steps": 40}, "tech")
    assert cache_key({"lr": 1e-3}) != cache_key({"lr": 2e-3}) and len(cache_key({})) == 12


def test_cached_steps_run_once_and_leave_nothing_when_interrupted(tmp_path):
    calls = []

    def build(staging):
        calls.append(staging)
        (staging / "weights.bin").write_bytes(b"1234")
        (staging / "done.json").write_text("{}")

    assert cached_directory(tmp_path / "step", "done.json", build) == tmp_path / "step"
    cached_directory(tmp_path / "step", "done.json", build)  # a rerun finds the finished step
    assert len(calls) == 1 and (tmp_path / "step" / "weights.bin").read_bytes() == b"1234"

    def interrupted(staging):
        (staging / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_directory(tmp_path / "other", "done.json", interrupted)
    assert not (tmp_path / "other").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["step"]

    assert cached_json(tmp_path / "texts" / "a.json", lambda: {"texts": ["x"]}) == {"texts": ["x"]}
    assert cached_json(tmp_path / "texts" / "a.json", lambda: pytest.fail("computed twice")) == {"texts": ["x"]}


def test_report_helpers(tmp_path):
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |"

    values = [float(v) for v in range(20)]
    low, high = bootstrap_interval(values, confidence=0.9, seed=3)
    assert low < statistics.mean(values) < high and (low, high) == bootstrap_interval(values, confidence=0.9, seed=3)
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    wider = bootstrap_interval(values, confidence=0.99, seed=3)
    assert wider[0] <= low and high <= wider[1]
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([])

    (tmp_path / "results").mkdir()
    image = tmp_path / "results" / "run_plot.png"
    image.write_bytes(b"png")
    text = publish_report(tmp_path / "docs" / "page.md", [image], lambda links: "\n".join(links))
    assert text == "images/run_plot.png" and (tmp_path / "docs" / "images" / "run_plot.png").read_bytes() == b"png"
    assert publish_report(tmp_path / "results" / "page.md", [image], "|".join) == "run_plot.png"  # beside its images
