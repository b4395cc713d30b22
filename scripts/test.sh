#!/usr/bin/env bash
# Set up (scripts/setup.sh --full), then run the test suite. Arguments go to pytest.
#
#   bash scripts/test.sh                      # everything under tests/
#   bash scripts/test.sh tests/unit -x        # a part of it
#   bash scripts/test.sh -m "not vllm"        # skip the real-vLLM end-to-end tests
#
# Exits non-zero when a test fails and also when no test ran (pytest's exit code 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"

bash scripts/setup.sh --full  # the tests start real etcd and NATS

# --durations=25: every CI log names the slowest tests (setup and teardown count), so a slow new one shows.
args=(-q -ra --durations=25 "$@")
# Without arguments, name tests/ explicitly; with them, pytest's testpaths (tests) still applies when
# the arguments hold no path.
(( $# == 0 )) && args=(tests "${args[@]}")

echo "[test] .venv/bin/python -m pytest ${args[*]}"
status=0
.venv/bin/python -m pytest "${args[@]}" || status=$?
if (( status == 5 )); then
    echo "[test] error: pytest collected no tests" >&2
    exit 1
fi
exit "${status}"
