import os

# Inductor's disk cache can hold a stale fake implementation of a kvfx op.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in the interpreter, and the
    # variable must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
