"""Speed of the synthetic projector next to diffdrr's renderer: ``python benchmarks/synth_bench.py``."""

from __future__ import annotations

import sys

from train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["synth-bench", *sys.argv[1:]]))
