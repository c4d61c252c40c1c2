import os

import pytest
import torch

# Two cores: more threads than that only adds contention between test processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
