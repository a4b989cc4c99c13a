"""`memory_centered`: the task memory compares conditions after subtracting the training tasks' mean condition, so
that in-context task vectors, which share one large direction, pick their nearest few tasks instead of spreading over
all of them. Off (the default, and every generator saved before the field existed) nothing changes."""

from pathlib import Path

import pytest
import torch

from peft_cvae import InvalidConfigError, PeftCVAEConfig, PeftCVAEGenerator
from peft_cvae.condition_similarity import condition_similarity
from peft_cvae.modeling_peft_cvae import TaskMemory
from tests.testing_utils import small_generator_overrides

FIXTURES = Path(__file__).parent / "fixtures"


def shared_direction_conditions(generator: torch.Generator) -> torch.Tensor:
    """Six task conditions (6, 16) that share one direction 50 times larger than what tells them apart, as
    hidden-state task vectors do."""
    return torch.full((6, 16), 5.0) + 0.1 * torch.randn(6, 16, generator=generator)


def test_centred_cosines_spread_out_conditions_that_share_a_direction():
    generator = torch.Generator().manual_seed(0)
    tasks = shared_direction_conditions(generator)
    query = tasks[2] + 0.03 * torch.randn(16, generator=generator)  # an unseen task close to task 2
    raw = condition_similarity(query[None], tasks)[0]
    centred = condition_similarity(query[None], tasks, centered=True)[0]
    assert raw.min() > 0.99  # raw: every task looks alike
    assert centred.argmax() == 2 and centred.max() - centred.sort().values[-2] > 0.3
    center = tasks.mean(dim=0)
    expected = torch.nn.functional.cosine_similarity(query - center, tasks[4] - center, dim=0)
    torch.testing.assert_close(centred[4], expected)


def test_a_centred_memory_gives_the_nearest_task_the_weight_a_raw_one_spreads():
    generator = torch.Generator().manual_seed(1)
    tasks = shared_direction_conditions(generator)
    query = (tasks[4] + 0.03 * torch.randn(16, generator=generator))[None]
    raw, centred = TaskMemory(6, 3), TaskMemory(6, 3, centered=True)
    for memory in (raw, centred):
        memory.log_temperature.data.fill_(torch.tensor(0.05).log())
    raw_weights, _ = raw.weights(query, tasks)
    centred_weights, best = centred.weights(query, tasks)
    assert raw_weights.max() < 0.3  # spread over the six tasks
    assert centred_weights.argmax() == 4 and centred_weights.max() > 0.9
    assert best[0] == condition_similarity(query, tasks, centered=True).max()


def test_the_option_is_saved_checked_and_used_for_neighbours(bank, tmp_path):
    generator = PeftCVAEGenerator.from_bank(bank, memory_centered=True, **small_generator_overrides())
    assert generator.task_memory.centered and generator.similarity_name == "centred cosine"
    assert PeftCVAEGenerator.from_bank(bank, **small_generator_overrides()).similarity_name == "cosine"
    generator.save_pretrained(tmp_path / "generator")
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    assert loaded.config.memory_centered and loaded.task_memory.centered
    # the neighbours generate_adapter reports are the ones the memory mixes by
    condition = bank.condition(bank.task_names[1]) + 0.01
    similarity = condition_similarity(condition[None].float(), loaded.task_conditions.float(), centered=True)[0]
    with torch.no_grad():
        weights, _ = loaded.task_memory.weights(condition[None].float(), loaded.task_conditions.float())
    neighbours = loaded.condition_neighbours(condition)
    assert neighbours[0]["task"] == bank.task_names[int(similarity.argmax())]
    assert neighbours[0]["similarity"] == pytest.approx(float(similarity.max()), abs=1e-4)
    assert neighbours[0]["memory_weight"] == pytest.approx(float(weights.max()), abs=1e-4)

    with pytest.raises(InvalidConfigError, match="task_memory=True"):
        PeftCVAEGenerator.from_bank(bank, task_memory=False, memory_centered=True)
    with pytest.raises(InvalidConfigError, match="true or false"):
        PeftCVAEConfig(memory_centered="yes")


def test_generators_saved_before_the_option_load_with_it_off():
    folder = next(path for path in sorted((FIXTURES / "task_memory_2a5d99f").iterdir()) if path.is_dir())
    before = PeftCVAEGenerator.from_pretrained(folder)
    assert before.config.memory_centered is False and not before.task_memory.centered
