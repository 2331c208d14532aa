"""Scale benchmarks (issue: streamed caches, caching on every rank).

- Peak RSS of stage 1 and of stage 2 with 1M synthetic cached captions vs 10k (target <= 1.2x):
  each run is a fresh process on the tiny config; the synthetic shards hold 2,000 images with 5
  English captions each, and their sidecars are written directly (random rows, the fingerprints
  of the config's encoders), so only the number of shards differs between the two sizes.
- `proalign cache` with 2 ranks vs 1 rank (torchrun, one thread per rank) on the same shards:
  captions per second of the encoding (target >= 1.7x), rounds alternated.
- Bytes per cached caption, bfloat16 vs float32 storage, 4096-d rows (target 0.5x).

    python benchmarks/scale.py [--captions 1000000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import ROOT

WORK = Path("/tmp/proalign-bench-scale")
PER_SHARD, CAPTIONS_PER_IMAGE = 2000, 5
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def _png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def _write_shard(path: Path, shard: int) -> None:
    png = _png()
    with tarfile.open(path, "w") as tar:
        for k in range(PER_SHARD):
            meta = {"captions": {"en": [f"synthetic caption {shard}-{k}-{c}" for c in range(CAPTIONS_PER_IMAGE)]}}
            for name, data in ((f"s{shard:04d}-{k:05d}.png", png), (f"s{shard:04d}-{k:05d}.json",
                                                                     json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _fingerprints() -> tuple[str, str, int, int]:
    """(LLM fingerprint, teacher fingerprint, LLM dim, CLIP dim) of the tiny config's encoders, built as the stage drivers build them."""
    import torch
    from proalign.config import load_config
    from proalign.models.proclip import ProCLIP, clip_embed_dim
    from proalign.models.towers import module_fingerprint
    cfg = load_config(TINY, [])
    torch.manual_seed(cfg.seed)
    model = ProCLIP.from_config(cfg)
    return model.embedder.fingerprint(), module_fingerprint(model.clip), model.embedder.dim, clip_embed_dim(model.clip)


def make_dataset(root: Path, captions: int) -> list[str]:
    """Shards with `captions` captions in all and their sidecars (random rows, current fingerprints)."""
    import torch
    from proalign.data.cache import EmbeddingCache
    shards = max(1, captions // (PER_SHARD * CAPTIONS_PER_IMAGE))
    root.mkdir(parents=True, exist_ok=True)
    llm_fp, clip_fp, llm_dim, clip_dim = _fingerprints()
    caches = [(EmbeddingCache(root / "cache", "llm", llm_fp), llm_dim),
              (EmbeddingCache(root / "cache", "clip", clip_fp), clip_dim)]
    urls = []
    for s in range(shards):
        url = root / f"synthetic-{s:04d}.tar"
        if not url.exists():
            _write_shard(url, s)
        urls.append(str(url))
    for cache, dim in caches:
        gen = torch.Generator().manual_seed(0)
        cache.build(urls, lambda texts, dim=dim: torch.randn(len(texts), dim, generator=gen), ["en"], progress=False)
    return urls


_CHILD = """
import resource, sys, json
from proalign.config import load_config
from proalign.stages.{stage} import run_{stage}
cfg = load_config({config!r}, {overrides!r})
run_{stage}(cfg, progress=False)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(stage: str, root: Path, urls: list[str]) -> float:
    out = root / f"run-{stage}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"output_dir={out}", f"data.cache_dir={root / 'cache'}", f"data.train_shards={json.dumps(urls)}",
                 "data.eval_shards=[]", "stage1.train.steps=40", "stage1.train.batch_size=64",
                 "stage2.train.steps=8", "stage2.train.batch_size=16", "stage2.train.eval_every=0"]
    code = _CHILD.format(stage=stage, config=str(TINY), overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    kb = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return kb / 1024


def rss_ratios(captions: int) -> dict:
    small = make_dataset(WORK / "10k", 10_000)
    large = make_dataset(WORK / "large", captions)
    out = {"captions_small": 10_000, "captions_large": len(large) * PER_SHARD * CAPTIONS_PER_IMAGE}
    for stage in ("stage1", "stage2"):
        a, b = peak_rss_mb(stage, WORK / "large", large), peak_rss_mb(stage, WORK / "10k", small)
        out[stage] = {"peak_rss_mb_large": a, "peak_rss_mb_10k": b, "ratio": a / b}
    return out


def cache_throughput(rounds: int) -> dict:
    """captions/s of `proalign cache` under torchrun with 1 and with 2 ranks, one thread each."""
    torchrun = Path(sys.executable).parent / "torchrun"
    shards = json.dumps([str(p) for p in sorted((ROOT / "data_shards").glob("styles-train-*.tar"))] +
                        [str(p) for p in sorted((ROOT / "data_shards").glob("clipart-train-*.tar"))])
    # a wider random embedder than the tests' so that encoding, not start-up, dominates
    arch = "{hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 4, intermediate_size: 1024, " \
           "max_position_embeddings: 128}"
    rates: dict = {1: [], 2: []}
    for _ in range(rounds):
        for ranks in (1, 2):
            cache = WORK / f"cache-{ranks}"
            shutil.rmtree(cache, ignore_errors=True)
            cmd = [str(torchrun), "--nproc_per_node", str(ranks), "--master_port", "29713", "-m", "proalign.cli",
                   "cache", "--config", str(TINY), "--no-progress", "--set", f"data.train_shards={shards}",
                   "--set", "data.eval_shards=[]", "--set", f"data.cache_dir={cache}", "--set", f"embedder.arch={arch}"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            line = next(l for l in proc.stdout.splitlines() if l.startswith("cache: "))
            stats = json.loads(line[len("cache: "):])
            rates[ranks].append(stats["llm"]["captions_encoded"] / stats["seconds"])
    import statistics
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    return {"captions_per_s_1_rank": one, "captions_per_s_2_ranks": two, "ratio": two / one, "rounds": rounds}


def bytes_per_caption(dim: int = 4096) -> dict:
    import torch
    from proalign.data.cache import EmbeddingCache
    url = str(ROOT / "data_shards" / "emoji-train-000.tar")
    out = {}
    for dtype in ("float32", "bfloat16"):
        cache = EmbeddingCache(WORK / "bytes" / dtype, "llm", "f" * 16, dtype)
        shutil.rmtree(cache.dir, ignore_errors=True)
        stats = cache.build([url], lambda texts: torch.randn(len(texts), dim), None, progress=False)
        out[dtype] = cache.sidecar(url).stat().st_size / stats["captions_encoded"]
    return {"dim": dim, "bytes_float32": out["float32"], "bytes_bfloat16": out["bfloat16"],
            "ratio": out["bfloat16"] / out["float32"]}


def run(captions: int = 1_000_000, rounds: int = 2) -> dict:
    start = time.time()
    result = {"rss": rss_ratios(captions), "cache_ranks": cache_throughput(rounds), "bytes": bytes_per_caption()}
    result["seconds"] = time.time() - start
    return result


def table_rows(r: dict) -> list[tuple]:
    rows = []
    n = r["rss"]["captions_large"]
    for stage in ("stage1", "stage2"):
        s = r["rss"][stage]
        rows.append((f"{stage} peak RSS, {n / 1e6:g}M / 10k cached captions",
                     f"{s['ratio']:.2f}x ({s['peak_rss_mb_large']:.0f} / {s['peak_rss_mb_10k']:.0f} MB)", "<= 1.2x",
                     s["ratio"] <= 1.2))
    c = r["cache_ranks"]
    rows.append(("proalign cache, 2 ranks / 1 rank captions/s", f"{c['ratio']:.2f}x ({c['captions_per_s_2_ranks']:.0f} "
                 f"/ {c['captions_per_s_1_rank']:.0f})", ">= 1.7x", c["ratio"] >= 1.7))
    b = r["bytes"]
    rows.append((f"bytes per cached caption, bf16 / fp32 ({b['dim']}-d)",
                 f"{b['ratio']:.3f}x ({b['bytes_bfloat16']:.0f} / {b['bytes_float32']:.0f} B)", "0.5x",
                 abs(b["ratio"] - 0.5) < 0.01))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    result = run(args.captions, args.rounds)
    for name, measured, target, met in table_rows(result):
        print(f"{name:<55} {measured:>32}  {target:>8}  {'yes' if met else 'NO'}")
    print(json.dumps(result, indent=1))
