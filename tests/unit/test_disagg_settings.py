"""Disaggregation settings: vLLM's KV transfer config per worker role, and the frontend's flags."""

from __future__ import annotations

import pytest

from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.frontend.prefill_policy import remote_block_count
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.vllm.nixl_settings import kv_transfer_config


def test_prefill_worker_is_a_producer_with_a_lease():
    config = kv_transfer_config("nixl", True, kv_role="kv_producer", kv_lease_duration=60)
    assert config == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
                      "kv_connector_extra_config": {"kv_lease_duration": 60}}


def test_decode_worker_is_a_consumer_that_recomputes_on_a_failed_pull():
    config = kv_transfer_config("nixl", False, kv_role="kv_consumer", kv_load_failure_policy="recompute")
    assert config == {"kv_connector": "NixlConnector", "kv_role": "kv_consumer",
                      "kv_load_failure_policy": "recompute"}  # no buffer device off the CPU platform


def test_bad_connector_settings_are_rejected():
    assert kv_transfer_config("none", True) is None
    with pytest.raises(ValueError, match="kv_load_failure_policy"):
        kv_transfer_config("nixl", True, kv_load_failure_policy="retry")
    with pytest.raises(ValueError, match="--connector"):
        kv_transfer_config("lmcache", True)


def test_frontend_disagg_flags_are_validated():
    assert FrontendConfig().disagg_min_prefill_tokens == 256 and FrontendConfig().disaggregation
    with pytest.raises(ConfigError, match="--disagg-min-prefill-tokens"):
        FrontendConfig(disagg_min_prefill_tokens=-1)
    with pytest.raises(ConfigError, match="--max-prefill-queue"):
        FrontendConfig(max_prefill_queue=-1)
    with pytest.raises(ConfigError, match="--enforce-disagg"):
        FrontendConfig(enforce_disagg=True, disaggregation=False)


def test_remote_block_count_reads_vllm_and_flat_block_lists():
    assert remote_block_count({"remote_block_ids": [[1, 2, 3]]}) == 3  # vLLM: one list per KV-cache group
    assert remote_block_count({"remote_block_ids": [[1, 2], [3, 4]]}) == 4
    assert remote_block_count({"remote_block_ids": [7, 8]}) == 2  # the mocker's flat list
    assert remote_block_count(None) == 0
