"""``fluorosam-rt bench``: end-to-end latency of the real node, next to a naive baseline and the floor.

The node runs as ``fluorosam-rt serve`` in its own process with a replay source, a subscriber runs
in another, and they talk over real ZeroMQ sockets. Every published frame's stage stamps come
from the node's flow-tracking ring (CLOCK_MONOTONIC) and are joined, by frame id, with the
subscriber's CLOCK_MONOTONIC receive time, so "frame in -> mask received" is one clock read in
each process and nothing else. See docs/benchmarks.md for what each number means.
"""
