import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


def pytest_configure(config):
    logging.getLogger("qatfx").setLevel(logging.INFO)
