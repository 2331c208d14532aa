"""Stage-2 step time vs a bare open_clip InfoNCE step (same image tower, adapter, batch and
AdamW; no EMA teacher, no self-distillation). Target: <= 1.15x.

Also splits our step into its parts (teacher forward, EMA update) to explain any overhead."""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import demo_config, model_without_embedder, side_by_side


def _models(tower: str):
    e5_width = "embedder.arch={hidden_size: 384}"  # the adapter's input width, without loading e5
    if tower == "demo":
        cfg = demo_config(e5_width)
    else:  # open_clip's ViT-B-16 image tower, 224 px
        cfg = demo_config(e5_width, "clip.model=ViT-B-16", "clip.arch=null", "data.image_size=224")
    model = model_without_embedder(cfg)
    return cfg, model


def _profile(step, tower: str, batch_size: int, steps: int = 3) -> Path:
    """torch.profiler over a few of our steps; the stage2/* ranges split the step into its parts."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    ranges = [e for e in averages if e.key.startswith("stage2/")]
    total = sum(e.cpu_time_total for e in ranges if e.key != "stage2/teacher_forward")
    lines = [f"# torch.profiler, {steps} stage-2 steps, {tower} tower, batch {batch_size}",
             "", "part of the step                   ms/step   share"]
    for e in sorted(ranges, key=lambda e: -e.cpu_time_total):
        # teacher_forward is nested inside student_forward_and_losses; its share is of the whole step
        lines.append(f"{e.key:<34} {e.cpu_time_total / 1e3 / steps:8.1f}   {e.cpu_time_total / total:5.1%}")
    lines += ["", "top operators by self CPU time:", "",
              averages.table(sort_by="self_cpu_time_total", row_limit=15)]
    out = Path(__file__).resolve().parent / "profiles" / f"stage2_{tower}_bs{batch_size}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def run(tower: str = "demo", batch_size: int = 64, rounds: int = 5) -> dict:
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss
    from proalign.stages.stage2 import Stage2Task
    torch.manual_seed(0)
    cfg, model = _models(tower)
    size = cfg.data.image_size or 224
    images = torch.randn(batch_size, 3, size, size)
    llm = torch.randn(batch_size, model.adapter.in_dim)
    batch = {"image": images, "llm": llm}

    task = Stage2Task(model, cfg.stage2, cfg.data, cfg.seed, shard_features=None)
    ours_opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5)

    visual, adapter = copy.deepcopy(model.clip.visual), copy.deepcopy(model.adapter)
    scale = torch.nn.Parameter(torch.tensor(1 / 0.07).log())
    bare_params = [*visual.parameters(), *adapter.parameters(), scale]
    bare_opt = torch.optim.AdamW(bare_params, lr=1e-5)
    clip_loss = ClipLoss()

    def ours():
        with torch.profiler.record_function("stage2/student_forward_and_losses"):
            loss, _ = task(batch)
        ours_opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("stage2/backward"):
            loss.backward()
        with torch.profiler.record_function("stage2/optimizer_step"):
            ours_opt.step()
        task.after_step()

    def bare():
        img = F.normalize(visual(images), dim=-1)
        txt = F.normalize(adapter(llm), dim=-1)
        loss = clip_loss(img, txt, scale.exp())
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    # the same task with lambda_sd = 0: the framework's own overhead, without the teacher forward
    cfg_no_sd = copy.deepcopy(cfg)
    cfg_no_sd.stage2.losses["self_distillation"] = 0.0
    no_sd = Stage2Task(copy.deepcopy(model), cfg_no_sd.stage2, cfg.data, cfg.seed, shard_features=None)
    no_sd_opt = torch.optim.AdamW([p for p in no_sd.parameters() if p.requires_grad], lr=1e-5)

    def ours_without_sd():
        loss, _ = no_sd(batch)
        no_sd_opt.zero_grad(set_to_none=True)
        loss.backward()
        no_sd_opt.step()
        no_sd.after_step()

    timing = side_by_side(ours, bare, rounds)
    timing_no_sd = side_by_side(ours_without_sd, bare, rounds, warmup=1)
    # where the extra time goes
    parts = {}
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(rounds):
            task.ema(images)
        parts["teacher_forward_s"] = (time.perf_counter() - start) / rounds
        start = time.perf_counter()
        for _ in range(rounds):
            task.ema.update(task.visual)
        parts["ema_update_s"] = (time.perf_counter() - start) / rounds
    profile = _profile(ours, tower, batch_size)
    return {"benchmark": f"stage-2 step vs bare open_clip step ({tower} tower, batch {batch_size})",
            "profile_file": str(profile.relative_to(Path(__file__).resolve().parent.parent)),
            "ours_s": timing["a_s"], "bare_s": timing["b_s"], "ratio": timing["ratio_a_over_b"],
            "ratio_min_max": timing["ratio_spread"], "rounds": rounds,
            "ratio_without_self_distillation": timing_no_sd["ratio_a_over_b"],
            **parts, "teacher_forward_share_of_bare_step": parts["teacher_forward_s"] / timing["b_s"],
            "target": "<= 1.15x"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tower", choices=["demo", "vitb16"], default="demo")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(json.dumps(run(args.tower, args.batch_size, args.rounds), indent=1))
