"""The `dl-moe` command and what it runs: demo, router comparison, benchmarks, plots.

Nothing in the library (`dl_moe.layer`, `gating/`, `dispatch`, `experts/`, ...) imports
this package except `RoutingMonitor.save_plots`, which draws with `dl_moe.tools.plots`.
"""
