"""NIXL alone on this machine: READ throughput between two processes, by descriptor size, vs memcpy.

The ceiling for vLLM's NixlConnector here. Two NIXL agents (the same UCX backend and thread count vLLM
configures) in two processes; the reader pulls a --mb MB buffer from the other process's registered
memory, split into descriptors of each size (the whole buffer, 4 MiB, 1 MiB, and 48 KiB, which is one
layer's K or V of one 128-token block of the default model: the granularity vLLM's connector uses),
best of --repeats, polling the transfer state in a tight loop. memcpy is np.copyto of a buffer of the
same size, best of --repeats, in the same run.

    .venv/bin/python benchmarks/bench_nixl_raw.py [--mb 44] [--repeats 5]
    UCX_TLS=tcp,self .venv/bin/python benchmarks/bench_nixl_raw.py    # TCP instead of shared memory
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

CHUNKS = (None, 4 << 20, 1 << 20, 48 << 10)  # None = one descriptor for the whole buffer


def agent(name: str):
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(num_threads=4))  # as vLLM's NixlConnector configures it


def register(nixl, buffer: np.ndarray) -> None:
    nixl.register_memory(nixl.get_reg_descs([(buffer.ctypes.data, buffer.nbytes, 0, "")], "DRAM"))


def serve_buffer(conn, size: int) -> None:
    """The remote side: register a buffer, hand over its metadata and address, wait to be told to go."""
    nixl = agent("target")
    buffer = np.ones(size, dtype=np.uint8)
    register(nixl, buffer)
    conn.send((nixl.get_agent_metadata(), buffer.ctypes.data))
    conn.recv()


def read_seconds(nixl, remote: str, local_addr: int, remote_addr: int, size: int, chunk: int,
                 repeats: int) -> float:
    count = size // chunk
    local = nixl.get_xfer_descs([(local_addr + i * chunk, chunk, 0) for i in range(count)], "DRAM")
    far = nixl.get_xfer_descs([(remote_addr + i * chunk, chunk, 0) for i in range(count)], "DRAM")
    best = float("inf")
    for _ in range(repeats):
        handle = nixl.initialize_xfer("READ", local, far, remote)
        start = time.perf_counter()
        nixl.transfer(handle)
        while (state := nixl.check_xfer_state(handle)) != "DONE":
            if state == "ERR":
                raise RuntimeError("NIXL transfer failed")
        best = min(best, time.perf_counter() - start)
        nixl.release_xfer_handle(handle)
    return best


def memcpy_seconds(size: int, repeats: int) -> float:
    source, target = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=44, help="buffer size in MiB (44: a 15-block prompt)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    size = args.mb << 20

    ours, theirs = mp.get_context("spawn").Pipe()
    remote_process = mp.get_context("spawn").Process(target=serve_buffer, args=(theirs, size))
    remote_process.start()
    try:
        metadata, remote_addr = ours.recv()
        nixl = agent("reader")
        buffer = np.zeros(size, dtype=np.uint8)
        register(nixl, buffer)
        remote = nixl.add_remote_agent(metadata)
        memcpy = size / memcpy_seconds(size, args.repeats) / 1e9
        print(f"{'descriptor':>12} {'count':>6} {'ms':>8} {'GB/s':>7} {'/ memcpy':>9}")
        for chunk in CHUNKS:
            chunk = chunk or size
            seconds = read_seconds(nixl, remote, buffer.ctypes.data, remote_addr, size, chunk, args.repeats)
            rate = size / seconds / 1e9
            label = f"{chunk >> 10} KiB" if chunk < (1 << 20) else f"{chunk >> 20} MiB"
            print(f"{label:>12} {size // chunk:>6} {seconds * 1e3:>8.2f} {rate:>7.2f} {rate / memcpy:>9.2f}")
        print(f"{'memcpy':>12} {'':>6} {size / memcpy / 1e6:>8.2f} {memcpy:>7.2f} {1.0:>9.2f}   ({args.mb} MiB)")
    finally:
        ours.send("done")
        remote_process.join(30)


if __name__ == "__main__":
    main()
