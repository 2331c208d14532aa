"""Chunked retrieval metrics vs the full similarity matrix: time and peak memory at two sizes
(5 captions per image). Each measurement runs in a fresh process so peak RSS is its own.
Target: chunked memory stays flat as N grows; the full matrix grows as N^2."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


# What "flat" means here: the chunked metric's extra peak stays under this bound at every N
# (its blocks are 1024 x 1024; the full matrix at 5k x 25k takes ~1.7 GB).
FLAT_BOUND_MB = 128


def full_matrix_metrics(image, text, owner, ks=(1, 5, 10)):
    """Reference: materialise the whole (M, N) similarity matrix at once."""
    import torch
    sims = text @ image.T
    t2i_rank = (sims > sims.gather(1, owner[:, None])).sum(1)
    own = owner[None, :] == torch.arange(image.shape[0])[:, None]  # (N, M)
    sims_t = sims.T
    best = sims_t.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
    i2t_rank = (sims_t > best).sum(1)
    return {**{f"t2i_R@{k}": (t2i_rank < k).float().mean().item() for k in ks},
            **{f"i2t_R@{k}": (i2t_rank < k).float().mean().item() for k in ks}}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(mode: str, n_images: int, dim: int) -> dict:
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from proalign.eval.retrieval import retrieval_metrics
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    owner = torch.arange(n_images).repeat_interleave(5)
    text = F.normalize(image[owner] + torch.randn(len(owner), dim, generator=g), dim=-1)
    # Warm up the thread pool and allocator on a tiny problem so their one-off buffers are not
    # billed to the metric; then reset the high-water mark (ru_maxrss would carry the launching
    # process's peak across exec) and measure from here on.
    small = torch.arange(64).repeat_interleave(5)
    (retrieval_metrics if mode == "chunked" else full_matrix_metrics)(image[:64], text[:320], small)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    start = time.perf_counter()
    metrics = retrieval_metrics(image, text, owner) if mode == "chunked" else full_matrix_metrics(image, text, owner)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"mode": mode, "images": n_images, "captions": len(owner), "seconds": seconds,
            "extra_peak_mb": (peak - base) / 1024, "t2i_R@1": metrics["t2i_R@1"]}


def run(sizes=(2500, 5000), chunked_only: int = 20000, dim: int = 512) -> dict:
    """Both modes at `sizes`; the chunked one also at `chunked_only` images (the full matrix
    would need ~40 GB there)."""
    rows = []
    jobs = [(mode, n) for n in sizes for mode in ("chunked", "full")] + [("chunked", chunked_only)]
    for mode, n in jobs:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(n), str(dim)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["mode"], r["images"]): r for r in rows}
    small, large = sizes
    assert abs(by[("chunked", large)]["t2i_R@1"] - by[("full", large)]["t2i_R@1"]) < 1e-6
    return {"benchmark": f"retrieval metrics, chunked vs full matrix ({large}x{5 * large})", "rows": rows,
            "memory_ratio_full_over_chunked": by[("full", large)]["extra_peak_mb"] /
            max(1e-3, by[("chunked", large)]["extra_peak_mb"]),
            "chunked_memory_growth": by[("chunked", large)]["extra_peak_mb"] /
            max(1e-3, by[("chunked", small)]["extra_peak_mb"]),
            "full_memory_growth": by[("full", large)]["extra_peak_mb"] / max(1e-3, by[("full", small)]["extra_peak_mb"]),
            "time_ratio_chunked_over_full": by[("chunked", large)]["seconds"] / by[("full", large)]["seconds"],
            "target": "chunked memory flat as N grows"}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        ap = argparse.ArgumentParser(description=__doc__)
        ap.add_argument("--sizes", type=int, nargs=2, default=[2500, 5000])
        ap.add_argument("--chunked-only", type=int, default=20000)
        args = ap.parse_args()
        print(json.dumps(run(tuple(args.sizes), args.chunked_only), indent=1))
