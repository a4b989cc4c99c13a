"""Generated adapters say where they came from (issue 16 items 7 and 8): provenance in the safetensors metadata and a
local PEFT-style card, and the training tasks nearest to the condition they were generated from."""

import hashlib
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open

import peft_cvae
from peft_cvae import PeftCVAEGenerator
from peft_cvae.constants import INTEGRITY_NAME
from peft_cvae.file_utils import sha256_file
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import TASKS, small_generator_overrides


class FixedEncoder:
    """A task encoder that maps any text to a fixed vector (enough to exercise the description/examples paths)."""

    def __init__(self, vector):
        self.vector = vector

    def encode(self, texts):
        return self.vector.clone()

    def to_dict(self):
        return {"kind": "text", "name_or_path": None}


def file_metadata(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata()


def test_saved_adapter_records_generator_hash_task_version_and_writes_a_card(trained_generator, tmp_path):
    trained_generator.save_pretrained(tmp_path / "generator")
    generator = PeftCVAEGenerator.from_pretrained(tmp_path / "generator").eval()
    adapter = generator.generate_adapter("ascending", seed=3, temperature=0.5)
    adapter.save_pretrained(tmp_path / "adapter")

    metadata = file_metadata(tmp_path / "adapter")
    assert metadata["generated_by"] == "peft-cvae" and metadata["task"] == "ascending"
    assert metadata["generator"] == str(tmp_path / "generator")
    assert metadata["generator_sha256"] == sha256_file(tmp_path / "generator" / INTEGRITY_NAME)
    assert metadata["peft_cvae_version"] == peft_cvae.__version__
    assert (metadata["seed"], metadata["temperature"]) == ("3", "0.5")
    # The card is the one push_to_hub uploads, written locally too, and left out of the integrity record.
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "peft" and "generated it for the task `ascending` (seed 3" in card.text
    record = json.loads((tmp_path / "adapter" / INTEGRITY_NAME).read_text())["files"]
    assert sorted(record) == ["adapter_config.json", "adapter_model.safetensors"]
    assert record["adapter_model.safetensors"] == sha256_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # Still a plain PEFT adapter.
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"), adapter_name="first")
    result = model.load_adapter(str(tmp_path / "adapter"), adapter_name="checked")
    assert result.unexpected_keys == [] and [key for key in result.missing_keys if "lora_" in key] == []


def test_description_examples_and_fusion_are_recorded(trained_generator, tmp_path):
    encoder = FixedEncoder(trained_generator.task_conditions[0] + 0.1)
    described = trained_generator.generate_adapter("numbers going up", task_encoder=encoder, seed=0)
    texts = ["1 2 3", "4 5 6"]
    from_examples = trained_generator.generate_adapter(examples=texts, task_encoder=encoder, seed=0)
    fused = trained_generator.generate_adapter(["ascending", "descending"], weights=[3, 1], seed=0)

    assert described.metadata["description"] == "numbers going up"
    assert from_examples.metadata["examples"] == 2
    assert from_examples.metadata["examples_sha256"] == hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    assert json.loads(fused.metadata["fused_tasks"]) == ["ascending", "descending"]
    assert json.loads(fused.metadata["fusion_weights"]) == pytest.approx([0.75, 0.25])
    described.save_pretrained(tmp_path / "described")
    assert file_metadata(tmp_path / "described")["description"] == "numbers going up"


def test_neighbours_are_the_cosine_similarities_to_the_training_tasks(trained_generator):
    conditions = trained_generator.task_conditions
    query = conditions[1] + 0.3 * conditions[2]
    adapter = trained_generator.generate_adapter(query, seed=0)

    expected = F.cosine_similarity(query[None], conditions, dim=-1)  # (T,)
    assert [entry["task"] for entry in adapter.neighbours] == [TASKS[i] for i in expected.argsort(descending=True)]
    for entry in adapter.neighbours:
        assert entry["similarity"] == pytest.approx(float(expected[TASKS.index(entry["task"])]), abs=1e-4)
    assert json.loads(adapter.metadata["neighbours"]) == adapter.neighbours
    assert trained_generator.generate_adapter("descending").neighbours[0] == {"task": "descending", "similarity": 1.0}


def test_a_condition_far_from_every_task_logs_a_warning(trained_generator, caplog):
    conditions = trained_generator.task_conditions
    pairwise = F.cosine_similarity(conditions[:, None], conditions[None], dim=-1)
    threshold = trained_generator.low_similarity_threshold()
    assert threshold == pytest.approx(float(pairwise[~torch.eye(len(conditions), dtype=torch.bool)].min()))

    with caplog.at_level(logging.WARNING, logger="peft_cvae.generation"):
        trained_generator.generate_adapter(conditions[0] + 0.01, seed=0)  # close to a task: quiet
        assert not caplog.records
        far = -conditions.sum(dim=0)  # opposite to every task
        adapter = trained_generator.generate_adapter(far, seed=0)
    assert adapter.neighbours[0]["similarity"] < threshold
    assert len(caplog.records) == 1 and "not close to any training task" in caplog.records[0].getMessage()


def test_task_memory_neighbours_report_the_mixing_weights(bank):
    generator = PeftCVAEGenerator.from_bank(bank, task_memory=True, **small_generator_overrides()).eval()
    with torch.no_grad():
        generator.task_memory.log_temperature.fill_(-1.0)
    query = generator.task_conditions[0] + generator.task_conditions[1]
    neighbours = generator.generate_adapter(query, temperature=0).neighbours

    similarity = F.cosine_similarity(query[None], generator.task_conditions, dim=-1)
    weights = torch.softmax(similarity / torch.tensor(-1.0).exp(), dim=-1)  # what TaskMemory.forward mixes with
    for entry in neighbours:
        assert entry["memory_weight"] == pytest.approx(float(weights[TASKS.index(entry["task"])]), abs=1e-4)
    assert sum(entry["memory_weight"] for entry in neighbours) == pytest.approx(1.0, abs=1e-3)  # all 3 tasks shown
