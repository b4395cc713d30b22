"""dynamo_lite: a disaggregated LLM serving runtime (OpenAI frontend, KV-aware router, vLLM workers)."""

__version__ = "0.1.0"
