"""The mocker: a simulated engine with the vLLM worker's interfaces, for CPU tests and benchmarks at scale.

`python -m dynamo_lite.mocker` runs N simulated workers in one process. Each one is a MockerEngine
(engine.py) behind the shared worker shell: it registers in etcd, serves the request plane and
relays KV events exactly like a vLLM worker, but its "GPU" is a paged block pool with prefix
caching (block_pool.py), a vLLM-v1-like continuous-batching scheduler (scheduler.py) and a step
time model (timing.py) scaled by --speedup-ratio. Token ids are random but reproducible.
It needs only the model folder's config.json (no weights, no torch).
"""
