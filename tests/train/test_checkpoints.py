"""The training loop's non-finite policy, checkpoint retention, DeepSpeed's loads under the weights-only guard, a full disk."""
import os
import pytest
import torch
from proalign.train import Runtime, StageTask


class _Diverging(StageTask):
    """A StageTask whose loss is finite until `bad_from`, then NaN."""

    name = "diverge"

    def __init__(self, bad_from):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.bad_from, self.step = bad_from, 0

    def next_batch(self):
        self.step += 1
        return {"step": self.step}

    def forward(self, batch):
        loss = (self.w ** 2).sum()
        return (loss * float("nan") if batch["step"] > self.bad_from else loss), {}

    def data_state(self):
        return {"step": self.step}

    def load_data_state(self, state):
        self.step = state["step"]

    def evaluate(self):
        return {}


def _train_cfg(steps, every):
    from proalign.config import TrainConfig
    return TrainConfig(steps=steps, batch_size=1, log_every=1, checkpoint_every=every, max_nonfinite_steps=5)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_nonfinite_losses_in_the_last_steps_fail_and_keep_the_last_good_checkpoint(tmp_path):
    from proalign.train import NonFiniteLossError, train
    StageTask.register(_Diverging)
    task = _Diverging(bad_from=8)  # steps 9 and 10 are NaN: fewer than max_nonfinite_steps
    task.train_cfg = _train_cfg(10, 5)
    with pytest.raises(NonFiniteLossError, match=r"last 2 step\(s\) gave non-finite losses.*step-0000005"):
        train(task, Runtime(device="cpu"), tmp_path, progress=False)
    done = sorted(p.name for p in (tmp_path / "diverge" / "checkpoints").iterdir() if p.is_dir())
    assert done == ["step-0000005"]


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    from proalign.train import NonFiniteLossError, train
    task = _Diverging(bad_from=100)
    task.after_step = lambda: task.w.data.fill_(float("inf")) if task.step == 4 else None
    task.train_cfg = _train_cfg(6, 2)
    with pytest.raises(NonFiniteLossError, match="non-finite weights"):
        train(task, Runtime(device="cpu"), tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "diverge" / "checkpoints").iterdir() if p.is_dir()] == ["step-0000002"]


def test_retention_counts_finished_checkpoints_only_and_resume_falls_back(tmp_path, caplog):
    from proalign.train.checkpoints import CheckpointManager
    ckpt = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6):
        (ckpt.root / f"step-{step:07d}-ds").mkdir(parents=True)  # DeepSpeed's folder, mid-save
        path = ckpt.save(step, {"w": torch.ones(1)}, None, {})
        (ckpt.root / f"step-{step:07d}-ds").rename(path / "deepspeed")
    assert [p.name for p in ckpt.finished()] == ["step-0000004", "step-0000006"]
    assert ckpt.latest(require="deepspeed").name == "step-0000006"
    import shutil
    shutil.rmtree(ckpt.root / "step-0000006" / "deepspeed")  # killed before the move
    with caplog.at_level("WARNING"):
        assert ckpt.latest(require="deepspeed").name == "step-0000004"
    assert "falling back to the newest complete checkpoint" in caplog.text


def test_deepspeed_resume_never_unpickles(tmp_path):
    """DeepSpeed's own loader (torch.load(weights_only=False)) runs weights-only under the engine's
    guard: a crafted *_model_states.pt is refused and its command never runs."""
    import pickle
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from proalign.train.backends import load_deepspeed_checkpoint, weights_only_loads
    marker = tmp_path / "pwned"
    crafted = tmp_path / "state" / "mp_rank_00_model_states.pt"
    crafted.parent.mkdir()
    torch.save({"module": _RunsCode(marker)}, crafted)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        TorchCheckpointEngine().load(str(crafted))
    assert not marker.exists()

    class FakeEngine:
        def load_checkpoint(self, folder, tag):
            return TorchCheckpointEngine().load(f"{folder}/{tag}/mp_rank_00_model_states.pt")
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        load_deepspeed_checkpoint(FakeEngine(), tmp_path)
    assert not marker.exists()
    import os
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the guard is scoped


@pytest.mark.slow  # multi-process launch (CI runs the slow set after the default one)
def test_real_zero2_checkpoint_loads_under_the_guard(free_port, tmp_path):
    """What the guard allows is enough for DeepSpeed's real ZeRO-2 files."""
    import subprocess
    import sys
    script = tmp_path / "save.py"
    script.write_text(f"""
import os, torch, deepspeed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
deepspeed.init_distributed(dist_backend="gloo")
m = torch.nn.Linear(4, 2)
cfg = {{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {{"stage": 2}}, "zero_allow_untested_optimizer": True}}
eng, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters()), config=cfg)
loss = eng(torch.randn(2, 4)).sum(); eng.backward(loss); eng.step()
eng.save_checkpoint({str(tmp_path / 'ck')!r}, tag="state")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from proalign.train.backends import weights_only_loads
    files = sorted((tmp_path / "ck" / "state").glob("*.pt"))
    assert any("optim_states" in f.name for f in files)
    with weights_only_loads():
        for f in files:
            assert isinstance(TorchCheckpointEngine().load(str(f)), dict)


def test_a_full_disk_at_a_checkpoint_names_the_path_and_the_last_good_one(tmp_path, monkeypatch):
    """The disk fills while a checkpoint is written: one error naming the checkpoint and the last
    complete one, no temporary folder left behind; a model file that cannot be written names itself."""
    import errno
    from proalign import storage
    from proalign.train.checkpoints import CheckpointManager
    from proalign.errors import ProalignError
    ckpt = CheckpointManager(tmp_path / "run")
    weights = {"w": torch.ones(3)}
    first = ckpt.save(10, weights, None, {})
    real = storage.save_file

    def fills_up(tensors, filename, metadata=None):
        if "rng" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(storage, "save_file", fills_up)
    with pytest.raises(ProalignError) as err:
        ckpt.save(20, weights, None, {})
    message = str(err.value)
    assert "step-0000020" in message and "No space left on device" in message and str(first) in message
    assert "\n" not in message
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["latest", "step-0000010"]
    with pytest.raises(ProalignError, match=r"model.safetensors: cannot write it \(.*No space left"):
        monkeypatch.setattr(storage, "save_file", lambda *a, **k: fills_up({}, "rng"))
        storage.save_tensors(weights, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob(".model.safetensors.tmp*"))
