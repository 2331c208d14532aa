#!/usr/bin/env python
"""Launch target for cache (python, torchrun or deepspeed): `deepspeed stages/cache_embeddings.py --config run.yaml`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proalign.cli import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
