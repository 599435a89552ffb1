"""Adapters that bring `dl_moe` layers into models of other libraries.

* `dl_moe.integrations.keras_hub`: `sparsify` / `unsparsify` keras-hub's MoE language
  models (needs the `keras-hub` extra).
"""
