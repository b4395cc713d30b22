"""`python -m dynamo_lite.vllm`: a vLLM worker.

vLLM's own argument parser (every `vllm serve` engine flag) plus ours (args.VllmWorkerConfig); the
engine is vLLM's AsyncLLM in this process (engine.VllmEngine), its KV events come from vLLM's ZMQ
publisher and are re-hashed into the project's content hashes (kv_events), and the shared worker
shell (dynamo_lite.engine.worker) registers it in etcd, serves the request plane and relays events.

Only this package imports vllm/torch; nothing the frontend or router imports may import it.
"""
