"""Bad input as a user's cluster produces it: every case is a clear error or a counted skip,
never a hang, a silent shrink of the data, or code run from a file (docs/reliability.md)."""
import contextlib
import os
import io
import json
import signal
from collections import Counter

import pytest
import torch
from PIL import Image

from proalign.train import Runtime, StageTask


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def good_members(n, start=0):
    out = []
    for i in range(start, start + n):
        out += [(f"s{i:03d}.jpg", _jpeg()), (f"s{i:03d}.json", json.dumps({"captions": {"en": [f"cap {i}"]}}).encode())]
    return out


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _batcher(shards, workers=0):
    import torchvision.transforms as T
    from proalign.data.shards import Batcher, ImageTextStream
    stream = ImageTextStream([str(s) for s in shards], T.Compose([T.Resize(4), T.ToTensor()]), ["en"], seed=0,
                             shuffle_buffer=4)
    return Batcher(stream, 2, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("case", ["zero_byte", "all_images_corrupt"])
def test_stream_over_unusable_shards_fails_fast_naming_them(write_shard, tmp_path, case, workers):
    from proalign.data.shards import EmptyStreamError
    shard = tmp_path / "bad-000.tar"
    if case == "zero_byte":
        shard.write_bytes(b"")
    else:
        write_shard(shard, [(n.replace(".jpg", ".jpg"), b"not a jpeg" if n.endswith(".jpg") else d)
                            for n, d in good_members(5)])
    with deadline(60), pytest.raises(Exception) as info:
        _batcher([shard], workers).next_batch()
    assert "bad-000.tar" in str(info.value) and "no usable sample in 2 passes" in str(info.value)
    if workers == 0:
        assert isinstance(info.value, EmptyStreamError)
    if case == "all_images_corrupt":
        assert "bad_image" in str(info.value)


def test_truncated_tar_is_a_counted_skip_naming_the_file(write_shard, tmp_path, caplog):
    from proalign.data.shards import read_captions, tar_is_complete
    whole = write_shard(tmp_path / "whole-000.tar", good_members(20))
    data = whole.read_bytes()
    cut = tmp_path / "cut-000.tar"
    cut.write_bytes(data[:len(data) // 2 + 100])  # mid-member
    assert tar_is_complete(str(whole)) and not tar_is_complete(str(cut))
    skips = Counter()
    assert len(read_captions(str(whole), ["en"], skips)) == 20 and not skips
    with caplog.at_level("WARNING"):
        items = read_captions(str(cut), ["en"], skips)
    assert skips["truncated_shard"] == 1
    assert 0 < len(items) < 20
    assert "cut-000.tar: truncated tar" in caplog.text and f"read {len(items)} samples" in caplog.text
    # a tar cut exactly after a member (no end-of-archive marker) counts too
    after_member = tmp_path / "boundary-000.tar"
    after_member.write_bytes(data[:512 * 4])
    assert not tar_is_complete(str(after_member))


def test_json_that_is_not_an_object_is_a_bad_json_skip(write_shard, tmp_path):
    from proalign.data.shards import read_captions
    shard = write_shard(tmp_path / "list-000.tar", good_members(3) + [("odd.jpg", _jpeg()), ("odd.json", b"[1, 2]")])
    skips = Counter()
    assert len(read_captions(str(shard), ["en"], skips)) == 3 and skips["bad_json"] == 1
    batcher = _batcher([shard])
    for _ in range(4):
        batcher.next_batch()
    assert batcher.skips["bad_json"] >= 1


def test_unsafe_member_names_are_counted_and_skipped(write_shard, tmp_path):
    from proalign.data.shards import read_captions
    members = good_members(2) + [("../evil.jpg", _jpeg()),
                                 ("../evil.json", json.dumps({"captions": {"en": ["up"]}}).encode()),
                                 ("/abs/x.jpg", _jpeg()), ("/abs/x.json", json.dumps({"captions": {"en": ["abs"]}}).encode())]
    shard = write_shard(tmp_path / "unsafe-000.tar", members)
    skips = Counter()
    items = read_captions(str(shard), ["en"], skips)
    assert [t for _, t in items] == ["cap 0", "cap 1"] and skips["unsafe_member_name"] == 2


def test_shard_edited_in_place_with_the_same_size_is_re_encoded_and_refused_stale(write_shard, tmp_path):
    from proalign.data.cache import EmbeddingCache, StaleCacheError
    shard = write_shard(tmp_path / "edit-000.tar", good_members(4))
    cache = EmbeddingCache(tmp_path / "cache", "llm", "f" * 16)
    encode = lambda texts: torch.tensor([[float(len(t)), float(t[-1].isdigit())] for t in texts])  # noqa: E731
    assert cache.build([str(shard)], encode, progress=False)["shards_encoded"] == 1
    ids, _, extras = cache.load([str(shard)])
    assert extras["shard_samples"] == {"edit-000.tar": 4}
    size = shard.stat().st_size
    write_shard(shard, good_members(4, start=5))  # other captions, same byte size
    assert shard.stat().st_size == size
    with pytest.raises(StaleCacheError, match="edit-000.tar is its shard changed"):
        cache.load([str(shard)])
    assert cache.build([str(shard)], encode, progress=False)["shards_encoded"] == 1
    assert cache.load([str(shard)])[0] == [f"s{i:03d}|en|0" for i in range(5, 9)]


# ----------------------------------------------------------------------------- engine: non-finite, checkpoints

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


def test_nonfinite_losses_in_the_last_steps_fail_and_keep_the_last_good_checkpoint(tmp_path):
    from proalign.config import RunConfig
    from proalign.train import NonFiniteLossError, train
    StageTask.register(_Diverging)
    task = _Diverging(bad_from=8)  # steps 9 and 10 are NaN: fewer than max_nonfinite_steps
    task.train_cfg = _train_cfg(10, 5)
    with pytest.raises(NonFiniteLossError, match=r"last 2 step\(s\) gave non-finite losses.*step-0000005"):
        train(task, Runtime(device="cpu"), tmp_path, progress=False)
    done = sorted(p.name for p in (tmp_path / "diverge" / "checkpoints").iterdir() if p.is_dir())
    assert done == ["step-0000005"]


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    from proalign.config import RunConfig
    from proalign.train import NonFiniteLossError, train
    task = _Diverging(bad_from=100)
    task.after_step = lambda: task.w.data.fill_(float("inf")) if task.step == 4 else None
    task.train_cfg = _train_cfg(6, 2)
    with pytest.raises(NonFiniteLossError, match="non-finite weights"):
        train(task, Runtime(device="cpu"), tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "diverge" / "checkpoints").iterdir() if p.is_dir()] == ["step-0000002"]


def test_retention_counts_finished_checkpoints_only_and_resume_falls_back(tmp_path, caplog):
    from proalign.checkpoints import CheckpointManager
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


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


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
def test_real_zero2_checkpoint_loads_under_the_guard(tmp_path):
    """What the guard allows is enough for DeepSpeed's real ZeRO-2 files."""
    import subprocess
    import sys
    script = tmp_path / "save.py"
    script.write_text(f"""
import os, torch, deepspeed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
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


def test_small_languages_weigh_by_their_images_in_every_mean(tmp_path):
    from proalign.eval.report import image_weighted_mean, language_table
    from proalign.eval.runner import write_eval_report
    rows = [{"dataset": "xm", "model": "m", "language": "en", "images": 400, "captions": 400, "t2i_R@1": 0.0},
            {"dataset": "xm", "model": "m", "language": "mi", "images": 5, "captions": 5, "t2i_R@1": 1.0}]
    for r in rows:
        r.update({k: r["t2i_R@1"] for k in ("t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")})
    assert image_weighted_mean(rows, "t2i_R@1") == pytest.approx(5 / 405)
    assert "| **mean (weighted by images)** | 0.012 |" in language_table(rows)
    text = write_eval_report(rows, tmp_path).read_text()
    assert "weighted by its number of images" in text and "| xm | m | 0.012 |" in text


def test_stage2_on_a_zero_byte_shard_exits_with_a_clear_error(run_cli, tmp_path):
    shard = tmp_path / "empty-000.tar"
    shard.write_bytes(b"")
    proc = run_cli(["stage2", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={tmp_path / 'run'}",
                    f"--set=data.cache_dir={tmp_path / 'cache'}", f"--set=data.train_shards=[{shard}]",
                    "--set=data.eval_shards=[]"], timeout=120)
    assert proc.returncode == 1
    assert f"error: no usable sample in 2 passes over 1 shard(s) ({shard})" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 5000  # no flood of repeated warnings


def test_cache_encodes_each_text_once_per_build_and_knows_its_languages(write_shard, tmp_path):
    from proalign.data.cache import EmbeddingCache, StaleCacheError
    multi = [(f"s{i}.jpg", _jpeg()) for i in range(4)]
    metas = [{"captions": {"en": ["cat" if i % 2 else "dog"], "de": ["Katze" if i % 2 else "Hund"]}} for i in range(4)]
    members = [m for i in range(4) for m in (multi[i], (f"s{i}.json", json.dumps(metas[i]).encode()))]
    a = write_shard(tmp_path / "a-000.tar", members)
    b = write_shard(tmp_path / "b-000.tar", members)  # the same texts again, in another shard
    seen = []

    def encode(texts):
        seen.extend(texts)
        return torch.tensor([[float(len(t)), float(sum(map(ord, t)))] for t in texts])
    per_shard = EmbeddingCache(tmp_path / "per-shard", "llm", "e" * 16)
    stats = per_shard.build([str(a), str(b)], encode, ["en"], progress=False, memo_bytes=0)
    assert sorted(seen) == ["cat", "cat", "dog", "dog"] and stats["texts_encoded"] == 4  # memo off: per shard
    seen.clear()
    cache = EmbeddingCache(tmp_path / "cache", "llm", "e" * 16)
    stats = cache.build([str(a), str(b)], encode, ["en"], progress=False)
    # the second shard's texts come from the memo, its sidecar the same as when encoded afresh
    assert sorted(seen) == ["cat", "dog"] and stats["texts_encoded"] == 2 and stats["texts_reused"] == 2
    assert stats["captions_encoded"] == 8
    assert per_shard.sidecar(str(b)).read_bytes() == cache.sidecar(str(b)).read_bytes()
    ids, feats, _ = cache.load([str(a), str(b)], ["en"])
    expected = ["cat" if int(cid.split("|")[0][1:]) % 2 else "dog" for cid in ids]  # ids: s<i>|en|0
    assert torch.equal(feats, encode(expected))
    with pytest.raises(StaleCacheError, match=r"cached for languages \['en'\]"):
        cache.load([str(a)], ["en", "de"])
    cache.build([str(a)], encode, ["en", "de"], progress=False)  # re-encoded for the wider set
    assert len(cache.load([str(a)], ["en", "de"])[0]) == 8


def test_cache_memo_is_bounded_least_recently_used_out_first():
    from proalign.data.cache import _RowMemo
    memo = _RowMemo(max_bytes=3 * 4 * 4)  # three rows of four float32
    batch = torch.arange(16, dtype=torch.float32).view(4, 4)
    for i, text in enumerate("abc"):
        memo.put(text, batch[i])
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("d", batch[3])
    assert memo.get("b") is None and memo.get("a") is not None and memo.get("d") is not None
    assert memo.bytes == 3 * 16 and memo.get("c")._base is None  # rows are copies, not views of the batch
    memo.put("huge", torch.zeros(100))  # larger than the whole memo: not kept
    assert memo.get("huge") is None and memo.bytes == 3 * 16


def _sidecar_with_flipped_tensor_bytes(path) -> None:
    """Flip bytes in the tensor data of a safetensors file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header
    for offset in range(start + 4, min(len(data), start + 64), 7):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated"])
def test_corrupted_cache_sidecar_is_refused_in_training_and_re_encoded_by_cache(write_shard, tmp_path, damage):
    """A sidecar whose tensor bytes changed after it was written (bit rot, a bad copy) or that was
    cut short: reading it for training raises the stale-cache error naming the file; `build`
    (`proalign cache`) re-encodes it to the same rows."""
    from proalign.data.cache import EmbeddingCache, StaleCacheError
    metas = [{"captions": {"en": [f"caption number {i}"]}} for i in range(6)]
    shard = write_shard(tmp_path / "s-000.tar", [m for i in range(6) for m in (
        (f"s{i}.jpg", _jpeg()), (f"s{i}.json", json.dumps(metas[i]).encode()))])
    encode = lambda texts: torch.tensor([[float(len(t)), float(sum(map(ord, t))), 1.0] for t in texts])  # noqa: E731
    cache = EmbeddingCache(tmp_path / "cache", "llm", "fp")
    assert cache.build([str(shard)], encode, progress=False)["shards_encoded"] == 1
    want = cache.shard_rows(str(shard))[1].clone()  # safetensors maps the file: keep a copy
    sidecar = cache.sidecar(str(shard))
    if damage == "flipped_bytes":
        _sidecar_with_flipped_tensor_bytes(sidecar)
    else:
        sidecar.write_bytes(sidecar.read_bytes()[: sidecar.stat().st_size // 2])
    with pytest.raises(StaleCacheError, match=rf"{sidecar.name}.*(corrupted|unreadable)"):
        cache.rows_by_sample(str(shard))
    with pytest.raises(StaleCacheError, match=rf"{sidecar.name}"):
        cache.shard_rows(str(shard))
    again = cache.build([str(shard)], encode, progress=False)
    assert again["shards_encoded"] == 1 and "shards_reused" not in again
    _, got, _ = cache.shard_rows(str(shard))
    assert torch.equal(got, want)


def _lock_of(pid: int, tmp_path, host=None):
    import socket
    from proalign.runlock import LOCK_NAME, _process_start
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "start": _process_start(pid), "command": "proalign stage2",
                                             "since": "2026-12-02 10:00:00"}))
    return run


def test_a_second_run_on_a_busy_output_dir_refuses_naming_the_holder(tmp_path, capsys):
    import subprocess
    import sys
    from proalign.cli import main
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = _lock_of(holder.pid, tmp_path)
        code = main(["stage1", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={run}"])
        err = capsys.readouterr().err
        assert code == 1 and f"is in use by proalign stage2 (PID {holder.pid} on" in err
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
        other_host = _lock_of(holder.pid, tmp_path, host="node-7")
        assert main(["stage1", "--config", "configs/tiny-cpu.yaml", "--no-progress",
                     f"--set=output_dir={other_host}"]) == 1
        err = capsys.readouterr().err
        assert "on node-7" in err and f"remove {other_host / '.proalign-lock'}" in err
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_gone_after_the_run(tmp_path):
    import subprocess
    import sys
    from proalign.runlock import LOCK_NAME, run_lock
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = _lock_of(gone.pid, tmp_path)
    with run_lock(run, "proalign stage1"):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        with run_lock(run, "proalign stage2"):  # the demo runs its stages inside its own lock
            pass
        assert (run / LOCK_NAME).exists()
    assert not (run / LOCK_NAME).exists()


def test_a_full_disk_at_a_checkpoint_names_the_path_and_the_last_good_one(tmp_path, monkeypatch):
    """The disk fills while a checkpoint is written: one error naming the checkpoint and the last
    complete one, no temporary folder left behind; a model file that cannot be written names itself."""
    import errno
    from proalign import storage
    from proalign.checkpoints import CheckpointManager
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
