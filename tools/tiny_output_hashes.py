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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sha256(path: Path) -> str:
    """Hash of the file's tensors (name, dtype, shape, bytes) and metadata, in sorted order: the
    safetensors writer orders metadata keys arbitrarily, so the raw file bytes differ run to run."""
    from safetensors import safe_open
    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        digest.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hash-only", action="store_true", help="hash the model files already in --out")
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
    if not args.hash_only:
        for name, extra in steps:
            if cli([name, *common, *extra]) != 0:
                raise SystemExit(f"{name} failed")
    hashes = {name: sha256(out / f"{name}.safetensors") for name, _ in steps}
    print(json.dumps(hashes, indent=1))
    (out / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n")


if __name__ == "__main__":
    main()
