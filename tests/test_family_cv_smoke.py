"""benchmarks/family_cv.py on the BIG-bench `tiny` preset: family folds over cached bank LoRAs only, every control and
generator design scored, parameter-space metrics, and nothing trained for a task whose LoRA is not cached."""

import json
import math
import shutil

import pytest

from benchmarks import bigbench_zero_shot, family_cv
from benchmarks.bigbench import pipeline
from benchmarks.bigbench.presets import LORA_FIELDS, PRESETS


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache holding the tiny split's bank LoRAs (what the benchmark's own run would have left there)."""
    cache = tmp_path_factory.mktemp("cache")
    settings = PRESETS["tiny"]
    base, tokenizer, _ = bigbench_zero_shot.load_models(settings, cache)
    selection, _ = bigbench_zero_shot.load_selection(settings, cache, tokenizer)
    bank_tasks = [selection["tasks"][path] for path in selection["split"]["train"]]
    pipeline.task_loras(base, tokenizer, bank_tasks, settings, cache, what="bank")
    return cache, bank_tasks


def test_family_cv_scores_unseen_folds_from_cached_loras_only(tiny_cache, tmp_path):
    cache, bank_tasks = tiny_cache
    assert len({task.family for task in bank_tasks}) >= 2
    missing = bank_tasks[-1]
    lora = cache / "loras" / PRESETS["tiny"].key(LORA_FIELDS) / missing.name
    shutil.move(lora, tmp_path / "moved")  # a task without a cached LoRA: left out, never trained
    try:
        arguments = ["--preset", "tiny", "--cache-dir", str(cache), "--work-dir", str(tmp_path / "work")]
        arguments += ["--output-dir", str(tmp_path / "out"), "--docs-dir", str(tmp_path / "docs"), "--folds", "2"]
        results = family_cv.main([*arguments, "--max-tasks", "2"])
    finally:
        shutil.move(tmp_path / "moved", lora)
    saved = json.loads((tmp_path / "out" / "family_cv_tiny.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert missing.name not in saved["tasks"] and not lora.with_name("moved").exists()
    folds = {info["fold"] for info in saved["tasks"].values()}
    assert folds == {0, 1}
    for fold in folds:  # whole families per fold
        families = {info["family"] for info in saved["tasks"].values() if info["fold"] == fold}
        others = {info["family"] for info in saved["tasks"].values() if info["fold"] != fold}
        assert not families & others
    assert len(saved["scores"]) == 2 and len(saved["parameters"]) == len(saved["tasks"])
    generated = {f"generated ({design})" for design in family_cv.DEFAULT_DESIGNS}
    for task, scores in saved["scores"].items():
        assert set(scores) == (set(family_cv.CONTROLS) - {"own checkpoint mean"}) | generated
        assert all(math.isfinite(score["answer_nll"]) for score in scores.values())
        assert scores["oracle"]["answer_nll"] < scores["base"]["answer_nll"]
        nearest = saved["parameters"][task]["nearest task"]
        assert saved["tasks"][nearest]["fold"] != saved["tasks"][task]["fold"]  # retrieval never sees the fold
    for metrics in saved["parameters"].values():
        assert metrics["own checkpoint mean"]["relative_sq_distance"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["mean of bank LoRAs"]["relative_sq_distance"] == pytest.approx(1.0)
    assert saved["summary"]["oracle"]["recovered_of_average"] == pytest.approx(1.0)
    page = (tmp_path / "docs" / "benchmarks_family_cv_tiny.md").read_text()
    assert "generated (task memory + holdout 1.0)" in page
