import json

import pytest
import torch
from safetensors.torch import load_file

from proalign.stages.cache import build_caches
from proalign.stages.stage1 import run_stage1
from proalign.data.cache import EmbeddingCache, StaleCacheError



def test_stage1_learns_and_reports(tiny_cfg, capsys):
    summary = run_stage1(tiny_cfg, progress=False)
    assert summary["heldout_cosine_after"] > summary["heldout_cosine_before"] + 0.2
    rows = [json.loads(line) for line in open(f"{tiny_cfg.output_dir}/metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["stage"] == "stage1"]
    assert sum(losses[-3:]) / 3 < losses[0]
    assert "teacher_truncated" in summary
    assert "held-out cosine" in capsys.readouterr().out
    weights = load_file(f"{tiny_cfg.output_dir}/stage1.safetensors")
    assert any(k.startswith("adapter.") for k in weights) and any(k.startswith("clip.") for k in weights)


@pytest.mark.slow  # two CLI processes, one killed with SIGKILL (CI runs the slow set after the default one)
def test_stage1_resume_after_kill_gives_same_adapter(run_cli, kill_at_step, tmp_path, shared_cache):
    common = ["--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=data.cache_dir={shared_cache}",
              "--set=stage1.train.steps=40", "--set=stage1.train.checkpoint_every=10"]
    from proalign.config import load_config  # the uninterrupted run in-process (the same seeding as the CLI)
    run_stage1(load_config("configs/tiny-cpu.yaml", [a.split("=", 1)[1] for a in common if a.startswith("--set=")]
                           + [f"output_dir={tmp_path / 'full'}"]), progress=False)
    killed = run_cli(["stage1", *common, f"--set=output_dir={tmp_path / 'crash'}"], code=kill_at_step(25))
    assert killed.returncode == -9
    resumed = run_cli(["stage1", *common, f"--set=output_dir={tmp_path / 'crash'}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "full" / "stage1.safetensors"))
    b = load_file(str(tmp_path / "crash" / "stage1.safetensors"))
    for key in a:
        if key.startswith("adapter."):
            assert torch.equal(a[key], b[key]), key


def test_cache_is_reused_and_stale_detected(tiny_cfg, tmp_path):
    import shutil
    from proalign.models.proclip import ProCLIP
    tiny_cfg.data.cache_dir = str(tmp_path / "own")  # counts encodings: not the shared cache
    model = ProCLIP.from_config(tiny_cfg)
    first = build_caches(tiny_cfg, model, progress=False)
    assert first["llm"]["shards_encoded"] == 2
    again = build_caches(tiny_cfg, model, progress=False)
    assert again["llm"]["shards_reused"] == 2 and "shards_encoded" not in again["llm"]
    shard = tmp_path / "copy.tar"
    shutil.copy(tiny_cfg.data.train_shards[0], shard)
    cache = EmbeddingCache(tmp_path / "c2", "llm", "fp")
    cache.build([str(shard)], lambda texts: torch.zeros(len(texts), 3), progress=False)
    with open(shard, "ab") as f:
        f.write(b"\0" * 1024)  # the shard changed after caching
    try:
        cache.load([str(shard)])
        raise AssertionError("stale cache was used")
    except StaleCacheError as err:
        assert "copy.tar" in str(err)


def test_metrics_have_one_row_per_step_after_a_crash_resume_and_a_rerun(tiny_cfg):
    """A run that died after its step-30 checkpoint had logged step 40 already: the resume replays
    steps 31-40 and must not log step 40 twice; a fresh rerun of the stage replaces its rows."""
    import shutil
    from pathlib import Path
    tiny_cfg.stage1.train.steps, tiny_cfg.stage1.train.checkpoint_every = 40, 10
    run_stage1(tiny_cfg, progress=False)
    checkpoints = Path(tiny_cfg.output_dir) / "stage1" / "checkpoints"
    shutil.rmtree(checkpoints / "step-0000040")
    (checkpoints / "latest").write_text("step-0000030")  # as if killed between steps 30 and 40

    def steps():
        rows = [json.loads(line) for line in open(f"{tiny_cfg.output_dir}/metrics.jsonl")]
        return [r["step"] for r in rows if r["stage"] == "stage1"]
    first = steps()
    run_stage1(tiny_cfg, resume=True, progress=False)
    assert steps() == first and len(first) == len(set(first))
    run_stage1(tiny_cfg, progress=False)
    assert steps() == first


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tiny_cfg, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (before preemption) mid-run: the step finishes, a checkpoint is written,
    the command says where and how to resume and exits 128+15; the resumed run ends bitwise equal
    to an uninterrupted one."""
    import os
    import signal
    from proalign.cli import main
    from proalign.train import loop
    common = ["--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=data.cache_dir={tiny_cfg.data.cache_dir}",
              "--set=stage1.train.steps=30", "--set=stage1.train.checkpoint_every=20"]
    assert main(["stage1", *common, f"--set=output_dir={tmp_path / 'full'}"]) == 0
    monkeypatch.setattr(loop, "STEP_HOOKS", [lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 13 else None])
    assert main(["stage1", *common, f"--set=output_dir={tmp_path / 'cut'}"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stage1: stopped by SIGTERM after step 13" in err and "step-0000013" in err and "--resume" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    monkeypatch.setattr(loop, "STEP_HOOKS", [])
    assert main(["stage1", *common, f"--set=output_dir={tmp_path / 'cut'}", "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "stage1.safetensors"))
    b = load_file(str(tmp_path / "cut" / "stage1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("adapter."))


def test_resume_applies_a_new_learning_rate_and_refuses_a_new_batch_size(tiny_cfg, caplog):
    """--resume with a changed config: the learning rate and the step count are applied (and said),
    a field that changes what the run computes (batch size, adapter shape, seed, data) is refused
    before anything is written, config.yaml included."""
    import logging
    from pathlib import Path
    from proalign.config import ConfigError
    from proalign.stages.common import write_run_config
    from proalign.train.optim import lr_lambda
    tiny_cfg.stage1.train.steps, tiny_cfg.stage1.train.checkpoint_every = 20, 10
    write_run_config(tiny_cfg, "stage1")  # what the CLI does before a stage
    run_stage1(tiny_cfg, progress=False)
    config_yaml = Path(tiny_cfg.output_dir) / "config.yaml"
    written = config_yaml.read_bytes()
    for field, value in (("batch_size", 32), ("seed", 5)):
        changed = __import__("copy").deepcopy(tiny_cfg)
        if field == "seed":
            changed.seed = value
        else:
            changed.stage1.train.batch_size = value
        refused = rf"--resume: .*{'seed: 0 -> 5' if field == 'seed' else 'stage1.train.batch_size: 64 -> 32'}"
        with pytest.raises(ConfigError, match=refused):
            write_run_config(changed, "stage1", resume=True)
        with pytest.raises(ConfigError, match=refused):
            run_stage1(changed, resume=True, progress=False)
        assert config_yaml.read_bytes() == written
    tiny_cfg.stage1.train.steps, tiny_cfg.stage1.train.optim.lr = 30, 0.004
    with caplog.at_level(logging.WARNING):
        run_stage1(tiny_cfg, resume=True, progress=False)
    assert "stage1.train.optim.lr: 0.002 -> 0.004 (applied)" in caplog.text
    rows = [json.loads(line) for line in open(f"{tiny_cfg.output_dir}/metrics.jsonl")]
    lr_at_30 = next(r["lr"] for r in rows if r["stage"] == "stage1" and r["step"] == 30)
    assert lr_at_30 == pytest.approx(0.004 * lr_lambda(tiny_cfg.stage1.train.optim, 30)(30))


def test_sigterm_during_cache_stops_with_a_message_and_exit_143(tiny_cfg, tmp_path, monkeypatch):
    import os
    import signal
    from proalign.data import cache as cache_module
    from proalign.stages.cache import run_cache
    from proalign.train import TrainingInterrupted
    tiny_cfg.data.cache_dir = str(tmp_path / "cache")
    real = cache_module.read_captions

    def terminated_while_reading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice, mid-shard
        return real(*args, **kwargs)
    monkeypatch.setattr(cache_module, "read_captions", terminated_while_reading)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="cache: stopped by SIGTERM; every shard finished so far is "
                                                  "cached. Run the same command again") as stopped:
        run_cache(tiny_cfg, progress=False)
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only


def test_a_batch_larger_than_the_data_is_said_with_the_counts(tiny_cfg, caplog):
    import logging
    from proalign.stages.stage1 import run_stage1
    tiny_cfg.stage1.train.steps, tiny_cfg.stage1.train.batch_size = 1, 4096
    with caplog.at_level(logging.WARNING):
        summary = run_stage1(tiny_cfg, progress=False)
    captions = summary["train_captions"]
    assert captions < 4096
    assert (f"stage1: a step takes 4096 cached captions (batch_size 4096 x accum_steps 1 x 1 rank(s)) from only "
            f"{captions}: each appears about {4096 / captions:.1f} times per step") in caplog.text
