"""Fixtures shared by several test files (pytest loads this file itself)."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module whose tiny model's ops are too small to gain from threads
    (on a loaded 2-core machine OpenMP threads waiting for each other make them many times
    slower); the previous thread count is restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
