"""Shared test fixtures and markers."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread: the suite also starts gadget/server subprocesses, and OpenMP threads spinning on
# oversubscribed cores made some tests 25-40x slower on the 2-core machine (same results either way).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``cuda``-marked tests automatically where no GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
