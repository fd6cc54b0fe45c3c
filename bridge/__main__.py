"""``python -m bridge ...``: the bridge commands without the fluorosam-rt node installed."""

import sys

from .cli import main

sys.exit(main(prog="python -m bridge"))
