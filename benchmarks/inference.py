"""Inference (forward-only) benchmark for the current KERAS_BACKEND (see dl_moe/tools/bench.py).

    KERAS_BACKEND=jax python benchmarks/inference.py --tokens 1,8,64,256,4096 --repeats 15

The same as `dl-moe bench --inference ...`.
"""

import sys

from dl_moe.tools.bench import main

if __name__ == "__main__":
    sys.exit(main(["--inference"] + sys.argv[1:]))
