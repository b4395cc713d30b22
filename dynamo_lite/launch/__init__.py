"""Process supervision and the local topologies the launch scripts start.

`supervisor` starts, waits for and stops processes (used by launch/*.sh, scripts/run.sh,
scripts/pd_smoke.py and the tests); `python -m dynamo_lite.launch TOPOLOGY` starts one of the
topologies in `topologies` (agg, agg_router, disagg, disagg_router, run).
"""
