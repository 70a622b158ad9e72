import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny LFM2-350M-pattern checkpoint with tokenizer files (fp32, random weights)."""
    from fastlfm.testing import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("lfm2-350m-tiny"), tiny_config("LFM2-350M"))


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request):
    """Every engine test runs both ways: each step's ids read back before the next step is
    scheduled (sync), and the next step launched first with the ids fed on the device (async,
    the CUDA default)."""
    return request.param


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    """The tiny checkpoint's model (fastlfm.models: no generate()), for engine tests."""
    from fastlfm.models import Lfm2ForCausalLM

    return Lfm2ForCausalLM.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def prompts():
    """Prompts of mixed lengths (a one-token one, one longer than a prefill chunk of the tests)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 19, 1, 37, 12)]
