"""keras-hub MoE models, stock vs sparsified, for the current KERAS_BACKEND
(see dl_moe/tools/bench_keras_hub.py; also `dl-moe bench --keras-hub`).

    KERAS_BACKEND=jax python benchmarks/keras_hub.py --repeats 5
"""

import os
import sys

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the keras_hub package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from dl_moe.tools.bench_keras_hub import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
