"""What a cluster run pays that grows with the data, measured side by side in one run:

- start-up (a cache check over every shard) at 10x the shard bytes vs 1x: target <= 1.1x;
- resume at step 300 vs step 10 (time to the first batch after the resume): target <= 1.2x;
- read amplification at 8 simulated ranks x 2 workers over 4 shards (bytes the readers read per
  epoch / the shards' sample bytes, from the library's own epoch plan): target 1.00;
- stage-1 peak RSS with a complete cache, a 335M vs a 2M random embedder: target <= 1.1x;
- caching from a local HTTP server vs local files (captions/s): target >= 0.8x.

    python benchmarks/cluster.py [--smoke]
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from common import ROOT

TINY = ROOT / "configs" / "tiny-cpu.yaml"
TRAIN = ROOT / "data_shards" / "emoji-train-000.tar"


def _samples(count: int) -> list[tuple[str, bytes]]:
    """The first `count` samples (image + JSON members) of the tiny training shard."""
    out, keys = [], []
    with tarfile.open(TRAIN) as tar:
        for member in tar:
            key = member.name.split(".")[0]
            if key not in keys:
                if len(keys) == count:
                    break
                keys.append(key)
            out.append((member.name, tar.extractfile(member).read()))
    return out


def _write(path: Path, members, padding: int = 0) -> Path:
    import io
    with tarfile.open(path, "w") as tar:
        key = members[0][0].split(".")[0]  # the padding travels with the first sample (never a sample of its own)
        for name, data in members[:1] + ([(f"{key}.pad", os.urandom(padding))] if padding else []) + members[1:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _cheap_encode(texts):
    import torch
    return torch.tensor([[float(len(t)), float(sum(map(ord, t)) % 997)] for t in texts])


def startup(work: Path, shard_mb: float, shards: int = 4, rounds: int = 3) -> dict:
    """A reused cache's check (what every start does) over shards of 1x and 10x the bytes."""
    from common import side_by_side
    from proalign.data.cache import EmbeddingCache
    members = _samples(32)
    sets = {}
    for scale in (1, 10):
        folder = work / f"startup-{scale}x"
        folder.mkdir(parents=True)
        urls = [str(_write(folder / f"s-{i:03d}.tar", members, int(shard_mb * scale * 2 ** 20))) for i in range(shards)]
        cache = EmbeddingCache(folder / "cache", "llm", "0" * 16)
        cache.build(urls, _cheap_encode, progress=False)
        sets[scale] = (cache, urls)
    timing = side_by_side(lambda: sets[10][0].build(sets[10][1], _cheap_encode, progress=False),
                          lambda: sets[1][0].build(sets[1][1], _cheap_encode, progress=False), rounds)
    return {"shard_mb": shard_mb, "shards": shards, "start_s_1x": timing["b_s"], "start_s_10x": timing["a_s"],
            "ratio": timing["ratio_a_over_b"]}


def _indexed_train_shard(work: Path):
    """The training shard with its cache (which records each sample's byte range: the index a
    split or a resume seeks by)."""
    from proalign.data.cache import EmbeddingCache
    cache = EmbeddingCache(work / "index-cache", "llm", "0" * 16)
    cache.build([str(TRAIN)], _cheap_encode, progress=False)
    return cache


def resume(work: Path, early: int, late: int, batch: int, rounds: int = 2) -> dict:
    """Time to the first batch of an image-text stream resumed from the position saved at step
    `late` vs at step `early` (the positions are reached once, untimed). A resume re-reads the
    samples waiting in the shuffle buffer: a buffer smaller than the shard is full at both
    positions, so the two differ only by the step."""
    import torchvision.transforms as T
    from common import side_by_side
    from proalign.data.shards import ImageTextStream
    from proalign.data.stream import Batcher
    preprocess = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    cache = _indexed_train_shard(work)

    def stream():
        return ImageTextStream([str(TRAIN)], preprocess, ["en"], seed=0, shuffle_buffer=256,
                               shard_index=cache.sample_spans)
    saved = {}
    for step in (early, late):
        batcher = Batcher(stream(), batch, 0)
        for _ in range(step):
            batcher.next_batch()
        saved[step] = batcher.position()

    def first_batch(step):
        Batcher(stream(), batch, 0, saved[step]).next_batch()
    timing = side_by_side(lambda: first_batch(late), lambda: first_batch(early), rounds, warmup=0)
    return {"early_step": early, "late_step": late, "batch": batch, "resume_s_early": timing["b_s"],
            "resume_s_late": timing["a_s"], "ratio": timing["ratio_a_over_b"]}


def read_amplification(work: Path, ranks: int = 8, workers: int = 2, shards: int = 4) -> dict:
    """Bytes the readers of one epoch read (the byte ranges of their parts, from the library's own
    epoch plan and the shards' cached index), over the shards' sample bytes."""
    from proalign.data.cache import EmbeddingCache
    from proalign.data.stream import plan_epoch
    members = _samples(8)
    urls = [str(_write(work / f"amp-{i:03d}.tar", members)) for i in range(shards)]
    cache = EmbeddingCache(work / "amp-cache", "llm", "0" * 16)
    cache.build(urls, _cheap_encode, progress=False)
    spans = {u: cache.sample_spans(u) for u in urls}
    count = ranks * workers
    read = 0
    for reader in range(count):
        for part in plan_epoch(urls, 0, 0, reader, count, lambda u: len(spans[u])):
            index = spans[part.url][part.first:part.last]
            read += index[-1][2] - index[0][1] if index else 0
    total = sum(index[-1][2] - index[0][1] for index in spans.values())
    return {"ranks": ranks, "workers": workers, "shards": shards, "ratio": read / total}


# The child's own high-water mark (VmHWM): ru_maxrss would carry over the parent's, which built the
# large embedder to fill the cache, across fork and exec.
_CHILD = """
import sys
sys.argv = ["x"]
from proalign.config import load_config
from proalign.stages.{stage} import run_{stage}
cfg = load_config({config!r}, {overrides!r})
summary = run_{stage}(cfg, progress=False)
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_RSS_KB", hwm, "BUILT", summary.get("embedder_built"))
"""


def _child(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout


def stage1_rss(work: Path, large_arch: dict, small_arch: dict, samples: int = 64) -> dict:
    """Stage 1's peak RSS on a complete cache, with a large and a small random embedder of the same
    width (the adapter's size follows the width, and it trains in both)."""
    from proalign.config import load_config
    from proalign.models.proclip import ProCLIP
    from proalign.stages.cache import build_caches
    import torch
    shard = str(_write(work / "rss-000.tar", _samples(samples)))
    out = {}
    for name, arch in (("large", large_arch), ("small", small_arch)):
        overrides = [f"output_dir={work / ('rss-' + name)}", f"data.cache_dir={work / ('rss-cache-' + name)}",
                     f"data.train_shards=[{shard}]", "data.eval_shards=[]", "stage1.train.steps=10",
                     "stage1.train.batch_size=32", f"embedder.arch={json.dumps(arch)}"]
        cfg = load_config(TINY, overrides)
        torch.manual_seed(0)
        build_caches(cfg, ProCLIP.from_config(cfg), progress=False)  # the complete cache, as `proalign cache` leaves it
        line = next(x for x in _child(_CHILD.format(stage="stage1", config=str(TINY), overrides=overrides)).splitlines()
                    if x.startswith("PEAK_RSS_KB"))
        out[f"peak_rss_mb_{name}"] = int(line.split()[1]) / 1024
        out[f"embedder_built_{name}"] = line.split()[-1] == "True"
    params = {name: sum(p.numel() for p in ProCLIP.from_config(load_config(TINY, [f"embedder.arch={json.dumps(arch)}"]))
                        .embedder.parameters()) for name, arch in (("large", large_arch), ("small", small_arch))}
    return {**out, "large_embedder_parameters": params["large"], "small_embedder_parameters": params["small"],
            "ratio": out["peak_rss_mb_large"] / out["peak_rss_mb_small"]}


def http_caching(work: Path, rounds: int = 3) -> dict:
    """captions/s of a cache build reading the shard from a local HTTP server vs from the file."""
    from common import side_by_side
    from proalign.data.cache import EmbeddingCache
    folder = work / "served"
    folder.mkdir()
    shutil.copy(TRAIN, folder / TRAIN.name)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{TRAIN.name}"
    counter = iter(range(10 ** 6))

    def build(source):
        cache = EmbeddingCache(work / f"http-cache-{next(counter)}", "llm", "0" * 16)
        return cache.build([source], _cheap_encode, progress=False)["captions_encoded"]
    captions = build(str(folder / TRAIN.name))
    try:
        timing = side_by_side(lambda: build(url), lambda: build(str(folder / TRAIN.name)), rounds)
    finally:
        server.shutdown()
    return {"captions": captions, "http_captions_per_s": captions / timing["a_s"],
            "local_captions_per_s": captions / timing["b_s"], "ratio": timing["b_s"] / timing["a_s"]}


BERT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "max_position_embeddings": 128}
# The same width as BERT_LARGE with one layer (most of its parameters are the vocabulary's rows).
ONE_LAYER_1024 = {**BERT_LARGE, "num_hidden_layers": 1, "intermediate_size": 1024}
SMOKE_LARGE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 256,
               "max_position_embeddings": 128}
SMOKE_SMALL = {**SMOKE_LARGE, "num_hidden_layers": 1}


def run(smoke: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="proalign-cluster-bench-"))
    try:
        return {"startup": startup(work, 0.25 if smoke else 5, rounds=1 if smoke else 21),
                "resume": resume(work, 1, 3, 8, rounds=1) if smoke else resume(work, 10, 300, 64),
                "read_amplification": read_amplification(work),
                "stage1_rss": (stage1_rss(work, SMOKE_LARGE, SMOKE_SMALL, 16) if smoke
                               else stage1_rss(work, BERT_LARGE, ONE_LAYER_1024, 64)),
                "http_caching": http_caching(work, rounds=1 if smoke else 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table_rows(r: dict) -> list[tuple]:
    s, res, amp, rss, web = (r[k] for k in ("startup", "resume", "read_amplification", "stage1_rss", "http_caching"))
    return [(f"start-up at 10x the shard bytes ({s['shard_mb'] * 10:g} MB shards) / 1x", f"{s['ratio']:.2f}x",
             "<= 1.1x", s["ratio"] <= 1.1),
            (f"resume at step {res['late_step']} / step {res['early_step']} (first batch)", f"{res['ratio']:.2f}x",
             "<= 1.2x", res["ratio"] <= 1.2),
            (f"read amplification, {amp['ranks']} ranks x {amp['workers']} workers over {amp['shards']} shards",
             f"{amp['ratio']:.2f}", "1.00", abs(amp["ratio"] - 1) < 1e-9),
            (f"stage-1 peak RSS, complete cache, {rss['large_embedder_parameters'] / 1e6:.0f}M / "
             f"{rss['small_embedder_parameters'] / 1e6:.0f}M embedder of one width",
             f"{rss['ratio']:.2f}x", "<= 1.1x", rss["ratio"] <= 1.1),
            ("caching from local HTTP / local files (captions/s)", f"{web['ratio']:.2f}x", ">= 0.8x", web["ratio"] >= 0.8)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="one tiny round of each (checks that they run)")
    result = run(ap.parse_args().smoke)
    for row in table_rows(result):
        print(" | ".join(str(x) for x in row))
    print(json.dumps(result, indent=1, default=float))
