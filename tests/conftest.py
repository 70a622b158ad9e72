import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# CPU kernel choices measured by the tests' engines go to a file of this run, not the user's cache.
os.environ["FASTLFM_CPU_KERNELS_FILE"] = os.path.join(tempfile.mkdtemp(prefix="fastlfm-tests-"), "cpu_kernels.json")
torch.set_num_threads(2)
# The engine's Triton kernels run on triton's interpreter where there is no GPU (tests/test_triton_kernels.py);
# it must be set before the first kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny LFM2-350M-pattern checkpoint with tokenizer files (fp32, random weights)."""
    from fastlfm.testing import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("lfm2-350m-tiny"), tiny_config("LFM2-350M"))


@pytest.fixture(scope="session")
def wandering_ckpt(tmp_path_factory):
    """A tiny checkpoint with a larger init scale than training uses: greedy outputs of the random
    model wander over the vocabulary instead of repeating one token, so parity checks have teeth."""
    from fastlfm.testing import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("wandering"), tiny_config("LFM2-350M", initializer_range=0.2))


@pytest.fixture(scope="session")
def vl_folder(tmp_path_factory):
    """A tiny LFM2-VL checkpoint (random weights, the LFM2 tokenizer)."""
    from fastlfm.testing import write_vl_checkpoint

    return write_vl_checkpoint(tmp_path_factory.mktemp("vl-gen"))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Two PNG files of random pixels: 300x200 (tiled into views) and 64x64."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    paths = []
    for name, (w, h) in {"a.png": (300, 200), "b.png": (64, 64)}.items():
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
        paths.append(str(folder / name))
    return paths


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
