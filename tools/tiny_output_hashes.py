#!/usr/bin/env python
"""SHA-256 of the tiny config's model files: teacher, stage 1, stage 2 and the CoOp head.

A refactor that must not change results is checked by running this before and after it:
`python tools/tiny_output_hashes.py --out /tmp/tiny-a` then compare the printed hashes."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.chdir(ROOT)
    from proalign.cli import main as cli
    out = Path(args.out)
    common = ["--config", "configs/tiny-cpu.yaml", "--no-progress", "--set", f"output_dir={out}",
              "--set", f"data.cache_dir={out / 'cache'}"]
    teacher = ["--set", f"clip.checkpoint={out / 'teacher.safetensors'}"]
    steps = [("teacher", []), ("stage1", teacher), ("stage2", [*teacher, "--set", f"init_from={out / 'stage1.safetensors'}"]),
             ("coop", [*teacher, "--set", f"init_from={out / 'stage2.safetensors'}", "--set", "coop.epochs=1",
                       "--set", "data.max_eval_samples=30"])]
    hashes = {}
    for name, extra in steps:
        if cli([name, *common, *extra]) != 0:
            raise SystemExit(f"{name} failed")
        hashes[name] = sha256(out / f"{name}.safetensors")
    print(json.dumps(hashes, indent=1))
    (out / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n")


if __name__ == "__main__":
    main()
