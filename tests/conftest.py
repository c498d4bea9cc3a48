import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global seed, whatever ran before it."""
    torch.manual_seed(0)
