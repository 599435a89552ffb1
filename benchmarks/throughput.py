"""Throughput / memory benchmark for the current KERAS_BACKEND (see dl_moe/tools/bench.py).

    KERAS_BACKEND=jax python benchmarks/throughput.py --cases a,b,c --scaling --memory
"""

import sys

from dl_moe.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
