"""Shared helpers: side-by-side timing (interleaved A/B rounds, median ratio) and model setup."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def side_by_side(a: Callable[[], None], b: Callable[[], None], rounds: int = 5, warmup: int = 1) -> dict:
    """Time a and b alternately (a, b, a, b, ...) so machine noise hits both; seconds per call.
    The ratio is the median of the per-round ratios, so a slow spell spoils one pair, not the result."""
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        a()
        times_a.append(time.perf_counter() - start)
        start = time.perf_counter()
        b()
        times_b.append(time.perf_counter() - start)
    ratios = [ta / tb for ta, tb in zip(times_a, times_b)]
    return {"a_s": statistics.median(times_a), "b_s": statistics.median(times_b),
            "ratio_a_over_b": statistics.median(ratios), "ratio_spread": (min(ratios), max(ratios))}


def demo_config(*overrides: str):
    from proalign.config import load_config
    os.chdir(ROOT)
    return load_config(ROOT / "configs" / "demo.yaml", ["output_dir=/tmp/proalign-bench", *overrides])


def model_without_embedder(cfg, width: int = 384):
    """The configured model with its adapter sized for an embedder of `width` that is never built
    (benchmarks time the image tower and adapter on random features)."""
    from proalign.models.deferred import DeferredEmbedder
    from proalign.models.proclip import ProCLIP
    record = {"fingerprint": "benchmark", "dim": width, "probe": []}
    return ProCLIP.from_config(cfg, embedder=DeferredEmbedder(cfg.embedder, record))
