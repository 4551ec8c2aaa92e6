"""Shared fixtures. Tests run offline, and build what they need into a per-session cache, except the SmolLM2
conversion (~45 s), which goes to the user's shared tapo cache so that it happens once per machine."""

import atexit
import os
import shutil
import tempfile

import pytest

# Before anything imports huggingface_hub, which reads these once: no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_USER_TAPO_CACHE = os.environ.get("TAPO_CACHE")
os.environ["TAPO_CACHE"] = tempfile.mkdtemp(prefix="tapo-test-cache-")
atexit.register(shutil.rmtree, os.environ["TAPO_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer folder (seed 0), built once per session."""
    from tapo.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct folder in the shared cache. Slow on first use: use only in slow tests."""
    from tapo.models import DEFAULT_MODEL, default_cache_dir, resolve_model

    with pytest.MonkeyPatch.context() as mp:  # the user's cache, not this session's temp one
        if _USER_TAPO_CACHE is None:
            mp.delenv("TAPO_CACHE")
        else:
            mp.setenv("TAPO_CACHE", _USER_TAPO_CACHE)
        shared_cache = default_cache_dir()
    return resolve_model(DEFAULT_MODEL, cache_dir=shared_cache)


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one torch thread on a busy 2-core machine (use it module-wide with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
