"""Peak RSS and time per step of `proalign demo`, run from scratch in a temporary directory.

The converted multilingual-e5-small in the user cache is reused if present (the conversion is a
one-off set-up step); the teacher, embedding cache and every stage are recomputed."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(out: Path) -> dict:
    """Runs in its own process, so RUSAGE_CHILDREN covers only the demo (and its loader workers)."""
    cmd = [sys.executable, "-m", "proalign.cli", "demo", "--output-dir", str(out), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"proalign demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"wall_s": wall, "peak_rss_gb": peak_kb / 2**20}


def run(keep: str | None = None) -> dict:
    out = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="proalign-demo-bench-"))
    child = subprocess.run([sys.executable, __file__, "--child", str(out)], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(child.stderr[-3000:])
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    steps = json.loads((out / "timings.json").read_text())
    return {"benchmark": "proalign demo from scratch", "output_dir": str(out), **measured,
            "steps_s": steps, "target": "<= 15 min on 2 CPU cores"}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_measure(Path(sys.argv[2]))))
    else:
        ap = argparse.ArgumentParser(description=__doc__)
        ap.add_argument("--output-dir", help="run directory (default: a new temporary one)")
        print(json.dumps(run(ap.parse_args().output_dir), indent=1))
