import pytest
import torch

# One intra-op thread: bitwise comparisons need reductions that do not depend on how work is
# split across threads (mvitv2's rel-pos gradients differ at 1e-9 with two), and the tiny
# models in these tests run faster without the threading overhead.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
