import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import torch

    # Tiny models: thread start-up costs more than it saves, and CI has 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    torch.manual_seed(0)
