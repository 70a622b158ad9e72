"""The OpenAI server's speed over HTTP (``fastlfm bench serve``), against SGLang's published figures.

    PYTHONPATH=src python bench/serve.py LFM2-1.2B --concurrency 1 16 100    # GPU: random bf16 weights
    PYTHONPATH=src python bench/serve.py --url http://127.0.0.1:8000 --tokenizer CKPT
    PYTHONPATH=src python bench/serve.py CKPT --device cpu --input-len 64 --output-len 32 --concurrency 1 4

See `fastlfm.server.benchmark` for what is measured and how.
"""

import sys

from fastlfm.server.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
