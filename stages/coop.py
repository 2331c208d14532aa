#!/usr/bin/env python
"""Launch target for the CoOp head: `python stages/coop.py --config run.yaml`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proalign.cli import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main(["coop", *sys.argv[1:]]))
