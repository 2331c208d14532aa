"""DeepSpeed as its JSON says: bf16 trains on CPU (DeepSpeed's CPU accelerator) close to fp32, the
EMA teacher stays in float32 and moves every step, and accumulation is counted in optimizer steps."""
import json
import os
import subprocess
import sys

import pytest
import torch

STEPS, ACCUM, LR, WARMUP = 4, 2, 0.005, 20


def _launch(repo_root, tmp_path, cache, port, name, bf16):
    ds_json = tmp_path / f"{name}.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": bf16},
                                   "steps_per_print": 10 ** 6}))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    args = ["stage2", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={tmp_path / name}",
            f"--set=data.cache_dir={cache}", f"--set=deepspeed={ds_json}", f"--set=stage2.train.steps={STEPS}",
            f"--set=stage2.train.accum_steps={ACCUM}", "--set=stage2.train.batch_size=8",
            "--set=stage2.train.checkpoint_every=2", "--set=stage2.train.log_every=1",
            f"--set=stage2.train.optim.lr={LR}", f"--set=stage2.train.optim.warmup_steps={WARMUP}",
            "--set=data.eval_shards=[]"]
    return subprocess.Popen([sys.executable, "-m", "proalign.cli", *args], cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # two DeepSpeed processes (CI runs the slow set after the default one)
def test_deepspeed_bf16_trains_close_to_fp32_with_a_float32_ema(repo_root, free_port, tmp_path, shared_cache):
    from safetensors.torch import load_file
    runs = {name: _launch(repo_root, tmp_path, shared_cache, free_port(), name, bf16)
            for name, bf16 in (("bf16", True), ("fp32", False))}
    for name, proc in runs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {output[-3000:]}"
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in runs}
    for name in runs:
        assert [r["step"] for r in rows[name]] == list(range(1, STEPS + 1))
        # the schedule counts optimizer steps: after 4 of them (8 micro-batches) the warm-up is at 5/20
        assert rows[name][-1]["lr"] == pytest.approx(LR * (STEPS + 1) / WARMUP)
    for a, b in zip(rows["bf16"], rows["fp32"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05), (a, b)
    ckpt = tmp_path / "bf16" / "stage2" / "checkpoints"
    early, late = (load_file(str(ckpt / f"step-{s:07d}" / "model.safetensors")) for s in (2, 4))
    assert early["visual.conv1.weight"].dtype == torch.bfloat16  # the engine did train in bf16
    ema = [k for k in early if k.startswith("ema.")]
    assert ema and all(early[k].dtype == torch.float32 for k in ema)
    moved = sum((early[k] != late[k]).sum().item() for k in ema) / sum(early[k].numel() for k in ema)
    assert moved > 0.9  # in bf16, (1 - 0.999) * delta rounds away and most of the teacher never moves
