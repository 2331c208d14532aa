#!/usr/bin/env python
"""Run every benchmark and print ratios against their targets; writes benchmarks/results.json.

    python benchmarks/run_all.py [--skip stage1_cache ...] [--vitb16] [--scale] [--demo] [--smoke]

Each ratio is measured side by side within this one run (interleaved A/B rounds), never
compared with numbers from another run or machine."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster  # noqa: E402
import demo_run  # noqa: E402
import loader  # noqa: E402
import retrieval_memory  # noqa: E402
import scale  # noqa: E402
import stage1_cache  # noqa: E402
import stage2_step  # noqa: E402
import structure_loss  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["stage1_cache", "structure_loss", "stage2_step", "loader", "retrieval", "cluster"])
    ap.add_argument("--smoke", action="store_true", help="one tiny round of every benchmark (CI: they still run); "
                    "the ratios mean nothing then, and results.json is not written")
    ap.add_argument("--vitb16", action="store_true", help="also time stage 2 with a ViT-B/16 tower (slow on CPU)")
    ap.add_argument("--demo", action="store_true", help="also run `proalign demo` from scratch (~15 min)")
    ap.add_argument("--scale", action="store_true", help="also run benchmarks/scale.py: 1M cached captions, "
                    "cache on 2 ranks, bf16 bytes (~6 min, 1 GB of synthetic shards in /tmp)")
    args = ap.parse_args()
    results, table = {}, []
    start = time.time()
    smoke = args.smoke
    if "stage1_cache" not in args.skip:
        r = results["stage1_cache"] = stage1_cache.run(batch_size=16, rounds=1) if smoke else stage1_cache.run()
        table.append(("stage-1 cache vs re-encode (e5-small)", f"{r['speedup']:.0f}x", ">= 50x", r["speedup"] >= 50))
    if "structure_loss" not in args.skip:
        r = results["structure_loss"] = structure_loss.run(((32, 16),), rounds=1) if smoke else structure_loss.run()
        table.append(("stage-1 adapter step, float64-Gram / pdist structure loss", f"{r['adapter_step_ratio']:.2f}x",
                      "<= 1.15x", r["adapter_step_ratio"] <= 1.15))
        for row in r["loss_alone"]:
            table.append((f"  loss alone ({row['batch']} x {row['dim']})", f"{row['ratio']:.2f}x", "(explains)", True))
    if "stage2_step" not in args.skip:
        towers = [("demo", 8, 1)] if smoke else [("demo", 64, 15)] + ([("vitb16", 8, 6)] if args.vitb16 else [])
        for tower, batch, rounds in towers:
            r = results[f"stage2_step_{tower}"] = stage2_step.run(tower, batch, rounds)
            table.append((f"stage-2 step / bare open_clip step ({tower}, bs {batch})", f"{r['ratio']:.2f}x",
                          "<= 1.15x", r["ratio"] <= 1.15))
            table.append((f"  same, lambda_sd=0 (no teacher forward) ({tower})",
                          f"{r['ratio_without_self_distillation']:.2f}x", "<= 1.15x",
                          r["ratio_without_self_distillation"] <= 1.15))
            table.append((f"  teacher forward / bare step ({tower})", f"{r['teacher_forward_share_of_bare_step']:.2f}",
                          "(explains)", True))
    if "loader" not in args.skip:
        r = results["loader"] = loader.run(batch_size=8, batches=2) if smoke else loader.run()
        table.append(("loader rate / stage-2 consumption", f"{r['ratio']:.1f}x", ">= 2x", r["ratio"] >= 2))
    if "retrieval" not in args.skip:
        r = results["retrieval"] = (retrieval_memory.run(sizes=(200, 400), chunked_only=800) if smoke
                                    else retrieval_memory.run())
        table.append(("retrieval peak memory, full / chunked (5k x 25k)", f"{r['memory_ratio_full_over_chunked']:.0f}x",
                      "(full ~N^2)", True))
        chunked = [row for row in r["rows"] if row["mode"] == "chunked"]
        sizes = " / ".join(f"{row['images'] / 1000:g}k" for row in chunked)
        peaks = [row["extra_peak_mb"] for row in chunked]
        # flat: bounded by the block size, not by N (allocator noise moves it by tens of MB)
        table.append((f"chunked extra peak MB at {sizes} images", " / ".join(f"{p:.0f}" for p in peaks),
                      f"< {retrieval_memory.FLAT_BOUND_MB} MB each", max(peaks) < retrieval_memory.FLAT_BOUND_MB))
        table.append(("  full-matrix memory growth 2.5k -> 5k images", f"{r['full_memory_growth']:.2f}x",
                      "(~4x)", True))
    if "cluster" not in args.skip:
        r = results["cluster"] = cluster.run(smoke)
        table.extend(cluster.table_rows(r))
    if args.scale:
        r = results["scale"] = scale.run()
        table.extend(scale.table_rows(r))
    if args.demo:
        r = results["demo"] = demo_run.run()
        table.append(("proalign demo total (2 CPU cores)", f"{r['wall_s'] / 60:.1f} min", "<= 15 min", r["wall_s"] <= 900))
        table.append(("  demo peak RSS", f"{r['peak_rss_gb']:.2f} GB", "(reported)", True))
        for step, seconds in r["steps_s"].items():
            if step != "total":
                table.append((f"  demo step: {step}", f"{seconds:.0f} s", "", True))
    width, mwidth, twidth = (max(len(t[i]) for t in table) for i in range(3))
    print(f"\n{'benchmark':<{width}}  {'measured':>{mwidth}}  {'target':>{twidth}}  met")
    for name, measured, target, met in table:
        print(f"{name:<{width}}  {measured:>{mwidth}}  {target:>{twidth}}  {('yes' if met else 'NO') if target else ''}")
    print(f"\n({time.time() - start:.0f} s)")
    if smoke:
        print("smoke run: every benchmark ran one tiny round; the ratios above are not measurements")
        return 0
    out = Path(__file__).resolve().parent / "results.json"
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
