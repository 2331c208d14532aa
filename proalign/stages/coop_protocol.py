"""CoOp's evaluation protocol as one command: one CoOp head per (shots K, seed), the few-shot
subset drawn per seed, mean ± std over seeds per K against the hand-written zero-shot prompt,
a table and CoOp's accuracy-vs-shots plot; optionally base-to-new (harmonic mean of base and new).

Each (K, seed) run lives in `<output_dir>/shots-<K>/seed-<seed>/` and ends with `result.json`;
re-running (after a kill, or with more shots or seeds) skips the runs that have one and resumes an
interrupted run from its checkpoints.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from ..config import RunConfig
from ..distributed import is_main
from ..storage import atomic_write_text
from ..eval.report import HANDWRITTEN, LEARNED, write_protocol_report

log = logging.getLogger(__name__)
def run_dir(out: Path, shots: int, seed: int) -> Path:
    return out / f"shots-{shots}" / f"seed-{seed}"


def _result(summary: dict) -> dict:
    """What the protocol keeps of one run: per part (all | base, new), per language, the accuracies."""
    parts = {"base" if summary.get("classes") == "base-to-new" else "all": summary["rows"]}
    if "rows_new" in summary:
        parts["new"] = summary["rows_new"]
    if "rows_in_domain" in summary:
        parts["in-domain"] = summary["rows_in_domain"]
    return {"shots": summary["shots"], "seed": summary["seed"], "classes": summary.get("classes", "all"),
            "parts": {part: [{k: r[k] for k in ("language", "classes", "images", HANDWRITTEN, LEARNED) if k in r}
                             for r in rows] for part, rows in parts.items()}}


def run_protocol(cfg: RunConfig, shots: Sequence[int], seeds: Sequence[int], base_to_new: bool = False,
                 progress: bool = True) -> list[dict]:
    """Train and evaluate one head per (K, seed); returns the per-run results and writes
    coop_protocol.md, coop_protocol.png and coop_protocol.jsonl in `cfg.output_dir`."""
    from ..models.proclip import ProCLIP
    from ..train.checkpoints import CheckpointManager
    from .coop import CoopTask, FeatureMemo, run_coop
    if not cfg.init_from:
        raise ValueError("coop protocol: set init_from (the stage-2 model the heads start from)")
    shots, seeds = sorted(set(shots)), list(dict.fromkeys(seeds))
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be positive integers, got {shots}")
    out = Path(cfg.output_dir)
    classes = "base-to-new" if base_to_new else "all"
    model: Optional[ProCLIP] = None
    memo = FeatureMemo()  # the image tower is frozen: each image is encoded once for every head
    results = []
    for k in shots:
        for seed in seeds:
            folder = run_dir(out, k, seed)
            done = folder / "result.json"
            if done.exists():
                result = json.loads(done.read_text())
                if result.get("classes") == classes:
                    print(f"coop protocol: shots {k}, seed {seed}: finished before, skipped")
                    results.append(result)
                    continue
                raise ValueError(f"{done}: a {result.get('classes')} run, but this protocol is {classes}; "
                                 "use another output_dir")
            print(f"coop protocol: shots {k}, seed {seed} ...")
            sub = copy.deepcopy(cfg)
            sub.output_dir, sub.seed, sub.coop.shots = str(folder), seed, k
            if model is None:
                model = ProCLIP.from_config(sub)
            elif sub.coop.train_adapter:  # the adapter trained in the last run: start from init_from again
                model.load(sub.init_from)
            # the engine checkpoints under <run>/<task name>/checkpoints
            resume = CheckpointManager(folder / CoopTask.name).latest() is not None
            summary = run_coop(sub, resume=resume, model=model, progress=progress, classes=classes,
                               save_model=False, memo=memo)
            result = _result(summary)
            if is_main():
                atomic_write_text(done, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
            results.append(result)
    log.info("coop protocol: %d images encoded once for %d heads", memo.encoded, len(shots) * len(seeds))
    if is_main():
        write_protocol_report(results, out, shots, seeds, base_to_new)
    return results
