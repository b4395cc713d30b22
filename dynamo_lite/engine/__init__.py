"""The Engine interface and the worker shell shared by every engine (vLLM, mocker)."""
