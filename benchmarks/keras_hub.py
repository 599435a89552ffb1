"""keras-hub MoE models, stock vs sparsified, for the current KERAS_BACKEND
(see dl_moe/tools/bench_keras_hub.py; also `dl-moe bench --keras-hub`).

    KERAS_BACKEND=jax python benchmarks/keras_hub.py --repeats 5
"""

import sys

from dl_moe.tools.bench_keras_hub import main

if __name__ == "__main__":
    sys.exit(main())
