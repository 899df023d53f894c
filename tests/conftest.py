"""Test-wide settings."""

import os

import pytest
import torch

# Tests must never reach a model hub; a missing file has to fail, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    # The models under test are tiny: thread start-up costs more than it saves, and on a shared
    # 2-core machine several threads per process slow a 4-step generation from 0.05 s to seconds.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
