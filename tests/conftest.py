import logging
import os

import pytest
import torch

# Without a CUDA GPU the Triton kernels run on CPU tensors in the interpreter. The variable
# must be set before any module defining a @triton.jit kernel is imported (qatfx's kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


def pytest_configure(config):
    logging.getLogger("qatfx").setLevel(logging.INFO)
