"""Shared by the MoE language-model tests: a tiny corpus and a one-thread fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is fastest and robust to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
