"""Shared test setup: few threads (CI has 2 cores), deterministic seeds, the ../shared/compat path."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

COMPAT = Path(__file__).resolve().parents[1].parent / "shared" / "compat"


@pytest.fixture
def compat_dir():
    if not COMPAT.is_dir():
        pytest.skip("../shared/compat is not present")
    return COMPAT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
