#!/usr/bin/env python
"""Launch target for stage2 (python, torchrun or deepspeed): `deepspeed stages/stage2_align.py --config run.yaml`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proalign.cli import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main(["stage2", *sys.argv[1:]]))
