import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interpret_triton_without_cuda() -> None:
    """Without a GPU, Triton kernels run in its interpreter, which must be chosen before anything
    imports triton: triton's own @jit library functions (tl.sum, ...) are created at import, and
    `import diffq` imports triton indirectly (diffusers -> torch._dynamo). On a GPU the kernel
    tests run the compiled kernels."""
    import torch  # does not import triton

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()


def pytest_configure(config):
    import torch

    # Tiny models: thread start-up costs more than it saves, and CI has 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    torch.manual_seed(0)
