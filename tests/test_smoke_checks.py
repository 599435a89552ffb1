import pytest

import dl_moe
from tests.layer_checks import run_moe_layer_checks


@pytest.mark.parametrize("gating_type", ["linear", "cosine", "softmoe"])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_builtin_routers_pass_layer_checks(gating_type, drop_tokens, tmp_path):
    def factory():
        return dl_moe.create_ffn_moe(
            num_experts=4, hidden_dim=8, top_k=2, gating_type=gating_type,
            intermediate_size=16, drop_tokens=drop_tokens,
        )

    run_moe_layer_checks(factory, (6, 8), tmp_path)
