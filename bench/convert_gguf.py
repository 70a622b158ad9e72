"""Convert a fastlfm test checkpoint to GGUF with llama.cpp's own converter.

    python bench/convert_gguf.py LLAMA_CPP_DIR CHECKPOINT --outtype f32|f16|bf16 --outfile X.gguf

Runs LLAMA_CPP_DIR/convert_hf_to_gguf.py (with its bundled gguf-py) unchanged, except for one
thing: the test checkpoints' tokenizer is LFM2-like (same split regex, byte-level BPE, special
ids) but its vocabulary is not the released one, so the converter's fingerprint of the
pre-tokenizer does not recognise it; the pre-tokenizer is declared "lfm2", as it is for the
released LFM2 checkpoints. Q8_0 / Q4_0 come from llama-quantize on the F32 file.
"""

import runpy
import sys
from pathlib import Path

if len(sys.argv) < 3:
    sys.exit(__doc__)
llama = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(llama), str(llama / "gguf-py")]
from conversion import base  # noqa: E402  (llama.cpp's conversion package)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "lfm2"
sys.argv = [str(llama / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
