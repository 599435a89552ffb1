"""One MoE FFN layer at the widths of Mixtral, Qwen1.5-MoE, Qwen3-MoE and GPT-OSS.

See `dl_moe/tools/real_sizes.py` for what each study measures; also
`dl-moe bench --real-sizes`.

    KERAS_BACKEND=jax python benchmarks/real_sizes.py --parts xla,keras_hub --json real_sizes_jax.json
    KERAS_BACKEND=torch python benchmarks/real_sizes.py --parts torch,decode --json real_sizes_torch.json
    KERAS_BACKEND=tensorflow python benchmarks/real_sizes.py --parts decode --json real_sizes_tf.json
"""

import os
import sys

# This folder holds keras_hub.py (the keras-hub benchmark), which would shadow the
# keras-hub package that the keras_hub study imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dl_moe.tools.real_sizes import main  # noqa: E402

if __name__ == "__main__":
    main()
