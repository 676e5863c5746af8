import os
import tempfile

# Inductor's disk cache can hold a stale fake implementation of a kvfx op.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
# Head maps the tests probe (RazorAttention with no heads) stay out of the user's cache.
os.environ["KVFX_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvfx-test-cache-")

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in the interpreter, and the
    # variable must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow check beside a faster one of the same behaviour; "
                                       "KVFX_SLOW=1 runs it (CI runs the faster subset)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KVFX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow check: KVFX_SLOW=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request, monkeypatch):
    """Triton forced on: interpreted for CPU tensors, compiled for CUDA ones."""
    from kvfx.kernels import dispatch

    monkeypatch.setenv("KVFX_KERNELS", "triton")
    if request.param == "cpu":
        if not dispatch.language_interpreted():
            pytest.skip("triton was imported without TRITON_INTERPRET=1: run in a fresh process instead")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)
