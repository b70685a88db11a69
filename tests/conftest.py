"""Shared test fixtures and markers."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import ismrmrd.xsd
import pytest
import torch
from _streams import known_kspace, make_acq, make_header, motion_stream, slice_lines, undersampled_rows

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


# synthetic ISMRMRD streams (builders in _streams.py)


@pytest.fixture
def header_factory() -> Callable[..., ismrmrd.xsd.ismrmrdHeader]:
    return make_header


@pytest.fixture
def header() -> ismrmrd.xsd.ismrmrdHeader:
    return make_header()


@pytest.fixture
def ism() -> SimpleNamespace:
    """The stream builders of ``_streams`` (test modules cannot import a ``conftest`` by name)."""
    return SimpleNamespace(
        make_header=make_header,
        known_kspace=known_kspace,
        make_acq=make_acq,
        slice_lines=slice_lines,
        undersampled_rows=undersampled_rows,
    )


@pytest.fixture
def stream_factory() -> Callable[..., SimpleNamespace]:
    """:func:`motion_stream`: a multi-coil stream with known motion per repetition."""
    return motion_stream
