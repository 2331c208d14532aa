import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from proalign.ema import EMATeacher
from proalign.losses import Objective, infonce_loss, self_distillation_loss



def test_ema_matches_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    ema = EMATeacher(net, momentum=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    history = []
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        history.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update(net)
    for key, value in ema.module.state_dict().items():
        # theta_bar_3 = m^3 theta_0 + (1-m) sum_k m^(3-k) theta_k
        expected = 0.9 ** 3 * start[key] + sum(0.1 * 0.9 ** (2 - i) * h[key] for i, h in enumerate(history))
        assert torch.allclose(value, expected, atol=1e-6), key
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_momentum_one_keeps_teacher_bit_identical():
    net = nn.Linear(4, 3)
    ema = EMATeacher(net, momentum=1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    local_i = image[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    local_t = text[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    loss = infonce_loss(local_i, local_t, torch.tensor(10.0))
    # Gradient of the mean of per-rank losses, as DDP/DeepSpeed averaging gives.
    (loss / world).backward()
    out = {"loss": loss.detach(), "gi": local_i.grad, "gt": local_t.grad}
    ema = torch.randn(8, 16, generator=g)[rank * 4:(rank + 1) * 4]
    for reduction in ("sum", "mean"):
        feats = image[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        sd, parts = self_distillation_loss(feats, ema, reduction)
        (sd / world).backward()
        out.update({f"sd_{reduction}": sd.detach(), f"sd_grad_{reduction}": feats.grad,
                    **{f"{k}_{reduction}": v for k, v in parts.items()}})
        # stage 1's objective on this rank's part of the stream's global batch
        student = image[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        s1, _ = Objective({"instance": 1.0, "structure": 0.5}, reduction)({"student": student, "teacher": ema})
        (s1 / world).backward()
        out.update({f"s1_{reduction}": s1.detach(), f"s1_grad_{reduction}": student.grad})
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_infonce_equals_single_process(free_port, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 16, generator=g).requires_grad_(True)
    text = torch.randn(8, 16, generator=g).requires_grad_(True)
    ref = infonce_loss(image, text, torch.tensor(10.0), gather=False)
    ref.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.stack([p["loss"] for p in parts]).mean().item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(torch.cat([p["gi"] for p in parts]), image.grad, atol=1e-5)
    assert torch.allclose(torch.cat([p["gt"] for p in parts]), text.grad, atol=1e-5)
    # self-distillation (both terms, both reductions): the same loss and gradient at any world size
    ema = torch.randn(8, 16, generator=g)
    for reduction in ("sum", "mean"):
        feats = image.detach().clone().requires_grad_(True)
        ref_sd, ref_parts = self_distillation_loss(feats, ema, reduction)
        ref_sd.backward()
        assert torch.stack([p[f"sd_{reduction}"] for p in parts]).mean().item() == pytest.approx(ref_sd.item(), rel=1e-5)
        for term in ("sd_instance", "sd_structure"):
            mean = torch.stack([p[f"{term}_{reduction}"] for p in parts]).mean().item()
            assert mean == pytest.approx(ref_parts[term].item(), rel=1e-5), (reduction, term)
        assert torch.allclose(torch.cat([p[f"sd_grad_{reduction}"] for p in parts]), feats.grad, atol=1e-6)
        # stage 1's instance + structure terms: each rank streams its own rows, the loss and the
        # gradient are those of the global batch
        student = image.detach().clone().requires_grad_(True)
        ref_s1, _ = Objective({"instance": 1.0, "structure": 0.5}, reduction)({"student": student, "teacher": ema})
        ref_s1.backward()
        mean = torch.stack([p[f"s1_{reduction}"] for p in parts]).mean().item()
        assert mean == pytest.approx(ref_s1.item(), rel=1e-5), reduction
        assert torch.allclose(torch.cat([p[f"s1_grad_{reduction}"] for p in parts]), student.grad, atol=1e-6)


def _launch_env(repo_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    return env


@pytest.mark.slow  # multi-process launch (CI runs the slow set after the default one)
def test_deepspeed_two_ranks_end_with_identical_weights(repo_root, free_port, tmp_path, shared_cache):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out = tmp_path / "ds"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "stages/stage2_align.py",
           "--config", "configs/tiny-cpu.yaml", "--no-progress",
           "--set", f"output_dir={out}", "--set", f"data.cache_dir={shared_cache}",
           "--set", "deepspeed=configs/deepspeed/zero1.json", "--set", "stage2.train.steps=4",
           "--set", "stage2.train.checkpoint_every=2", "--set", "stage2.train.batch_size=8",
           "--set", "data.eval_shards=[]"]
    proc = subprocess.run(cmd, cwd=repo_root, env=_launch_env(repo_root, tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sums = [(out / "replicas" / f"stage2-rank{r}.txt").read_text() for r in range(2)]
    assert sums[0] == sums[1]
    assert (out / "stage2.safetensors").exists()
    # retention counts finished checkpoints only: both kept, each with its DeepSpeed state
    kept = sorted(p.name for p in (out / "stage2" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-0000002", "step-0000004"]
    assert all((out / "stage2" / "checkpoints" / k / "deepspeed").is_dir() for k in kept)


def _stage2_args(cache, out, *extra):
    return ["stage2", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={out}",
            f"--set=data.cache_dir={cache}", "--set=stage2.train.steps=12",
            "--set=stage2.train.checkpoint_every=4", "--set=stage2.train.log_every=4",
            "--set=stage2.train.batch_size=16", "--set=stage2.train.eval_every=0",
            "--set=data.max_eval_samples=30", *extra]


@pytest.mark.slow  # two CLI processes, one killed with SIGKILL (CI runs the slow set after the default one)
def test_stage2_resume_after_kill_matches_uninterrupted_run(run_cli, kill_at_step, tmp_path, shared_cache):
    import json
    from safetensors.torch import load_file
    from proalign.config import load_config
    from proalign.stages.stage2 import run_stage2
    args = _stage2_args(shared_cache, tmp_path / "full")  # the uninterrupted run in-process
    run_stage2(load_config("configs/tiny-cpu.yaml", [a.split("=", 1)[1] for a in args if a.startswith("--set=")]),
               progress=False)
    killed = run_cli(_stage2_args(shared_cache, tmp_path / "crash"), code=kill_at_step(6))
    assert killed.returncode == -9
    resumed = run_cli(_stage2_args(shared_cache, tmp_path / "crash", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final(run):
        rows = [json.loads(line) for line in open(tmp_path / run / "summary.jsonl")]
        return {k: v for k, v in rows[-1].items() if k.startswith(("loss", "after_", "logit_scale"))}
    a, b = final("full"), final("crash")
    assert a and a == b
    wa, wb = load_file(str(tmp_path / "full" / "stage2.safetensors")), load_file(str(tmp_path / "crash" / "stage2.safetensors"))
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow  # multi-process launch (CI runs the slow set after the default one)
def test_torchrun_two_ranks_cache_their_own_shards_then_train_plain_torch(repo_root, free_port, tmp_path, shared_cache):
    """Both ranks encode a disjoint share of the shards (byte-identical to the one-process cache),
    then train with DDP to identical replicas; the frozen embedder is in no checkpoint."""
    from safetensors.torch import load_file
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "stages/stage2_align.py",
           "--config", "configs/tiny-cpu.yaml", "--set", f"output_dir={out}",
           "--set", f"data.cache_dir={cache}", "--set", "stage2.train.steps=4", "--set", "stage2.train.checkpoint_every=4",
           "--set", "stage2.train.batch_size=8", "--set", "data.max_eval_samples=20"]
    proc = subprocess.run(cmd, cwd=repo_root, env=_launch_env(repo_root, tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sums = [(out / "replicas" / f"stage2-rank{r}.txt").read_text() for r in range(2)]
    assert sums[0] == sums[1]
    assert "cache llm [rank 0/2]" in proc.stderr and "cache llm [rank 1/2]" in proc.stderr
    (llm_dir,) = cache.glob("llm-*")
    written = sorted(p.name for p in llm_dir.glob("*.safetensors"))
    assert [n.rsplit("-", 1)[0] for n in written] == ["emoji-test-000", "emoji-train-000"]
    assert written == sorted(p.name for p in (shared_cache / llm_dir.name).glob("*.safetensors"))
    for name in written:
        assert (llm_dir / name).read_bytes() == (shared_cache / llm_dir.name / name).read_bytes(), name
    state = load_file(str(out / "stage2" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert not [k for k in state if "embedder" in k]
    assert {k.split(".")[0] for k in state} == {"visual", "adapter", "ema", "logit_scale"}
