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
