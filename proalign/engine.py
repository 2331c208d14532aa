"""The one training loop shared by every stage: plain torch (optionally DDP) or DeepSpeed,
with atomic checkpoints, exact resume, JSONL + TensorBoard metrics and a progress bar.

A stage supplies a `StageTask`: an nn.Module whose `forward(batch)` returns (loss, metrics),
plus `next_batch`, `after_step` (EMA update, logit-scale clamp) and its data position.
"""
from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import OptimConfig, RunConfig, TrainConfig, save_config
from .errors import ProalignError
from .models.checkpoint import CheckpointManager

log = logging.getLogger(__name__)


class NonFiniteLossError(ProalignError, RuntimeError):
    pass


class StageTask(nn.Module, abc.ABC):
    """Interface a stage implements; the engine owns everything else."""

    name = "stage"

    @abc.abstractmethod
    def next_batch(self) -> dict:
        """The next training batch (moved to the device by `forward`)."""

    def after_step(self) -> None:
        """Called after every optimizer step (EMA update, clamping)."""

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        """Restore the data position saved by `data_state`."""

    def skip_counts(self) -> dict:
        return {}

    def evaluate(self) -> dict:
        """Held-out metrics, run on rank 0 every `train.eval_every` steps (none by default)."""
        return {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def init_distributed(device: torch.device, use_deepspeed: bool) -> tuple[int, int]:
    """Join the process group when launched by torchrun/deepspeed; (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if use_deepspeed:
            import deepspeed
            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size()


def lr_lambda(optim: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / max(1, optim.warmup_steps)
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases, logit scale
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def _deepspeed_config(path: str, train: TrainConfig, device: torch.device) -> dict:
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config.setdefault("gradient_accumulation_steps", 1)
    config.pop("train_batch_size", None)
    if train.optim.grad_clip:
        config["gradient_clipping"] = train.optim.grad_clip
    config["zero_allow_untested_optimizer"] = True
    if device.type != "cuda":  # CPU: no half precision kernels worth using
        for key in ("bf16", "fp16"):
            config.setdefault(key, {})["enabled"] = False
    return config


class JsonlLogger:
    def __init__(self, run_dir: Path, enabled: bool, stage: str):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.stage = stage
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard" / stage))
            except ImportError:  # tensorboard is optional
                log.warning("tensorboard not installed: TensorBoard events are not written")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{self.stage}/{key}", value, step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def _kill_hook(step: int) -> None:
    """Test hook: PROALIGN_KILL_AT_STEP=N sends SIGKILL to this process after step N."""
    target = os.environ.get("PROALIGN_KILL_AT_STEP")
    if target and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def train(task: StageTask, cfg: RunConfig, train_cfg: TrainConfig, run_dir: str | Path,
          resume: bool = False, device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """Run `train_cfg.steps` optimizer steps of `task`; returns the last logged metrics."""
    run_dir = Path(run_dir)
    device = device or resolve_device(cfg.device)
    use_ds = bool(cfg.deepspeed)
    if use_ds:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            log.warning("deepspeed not installed: running %s in plain torch", task.name)
            use_ds = False
    rank, world = init_distributed(device, use_ds)
    is_main = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    task.to(device)
    threads = torch.get_num_threads()
    if cfg.deterministic and device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _train_loop(task, cfg, train_cfg, run_dir, resume, device, progress, use_ds, rank, world, is_main)
    finally:
        torch.set_num_threads(threads)


def _train_loop(task, cfg, train_cfg, run_dir, resume, device, progress, use_ds, rank, world, is_main):
    from tqdm.auto import tqdm
    params = [p for p in task.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{task.name}: nothing to train (no parameter requires grad)")
    optimizer = build_optimizer(params, train_cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg.optim, train_cfg.steps))
    model: nn.Module = task
    ds_engine = None
    if use_ds:
        import deepspeed
        ds_engine, optimizer, _, scheduler = deepspeed.initialize(
            model=task, optimizer=optimizer, lr_scheduler=scheduler,
            config=_deepspeed_config(cfg.deepspeed, train_cfg, device))
        model = ds_engine
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)

    ckpt = CheckpointManager(run_dir / task.name)
    start_step = 0
    if resume:
        latest = ckpt.latest(require="deepspeed" if use_ds else None)
        if latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt.root)
        else:
            tensors, state = ckpt.load(latest, None if use_ds else optimizer)
            task.load_state_dict(tensors, strict=True)
            if use_ds:
                load_deepspeed_checkpoint(ds_engine, latest / "deepspeed")
            else:
                scheduler.load_state_dict(state["scheduler"])
            random.setstate(_tuples(state["python_rng"]))
            np.random.set_state(_np_state(state["numpy_rng"]))
            task.load_data_state(state.get("data", {}))
            start_step = state["step"]
            log.info("resumed %s from %s (step %d)", task.name, latest, start_step)

    metrics_log = JsonlLogger(run_dir, is_main, task.name)
    nonfinite_total, nonfinite_run = 0, 0
    last: dict = {}
    bar = tqdm(range(start_step, train_cfg.steps), initial=start_step, total=train_cfg.steps,
               desc=task.name, disable=not (progress and is_main), unit="step")
    model.train()
    for step in bar:
        batch = task.next_batch()
        loss, metrics = model(batch)
        if not torch.isfinite(loss):
            nonfinite_total += 1
            nonfinite_run += 1
            log.warning("%s step %d: non-finite loss %s skipped (%d so far)", task.name, step, loss.item(),
                        nonfinite_total)
            if nonfinite_run >= train_cfg.max_nonfinite_steps:
                raise NonFiniteLossError(f"{task.name}: {nonfinite_run} consecutive non-finite losses at step "
                                         f"{step}; lower the learning rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            continue
        nonfinite_run = 0
        if ds_engine is not None:
            ds_engine.backward(loss)
            ds_engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(params, train_cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
        task.after_step()
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            last = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                    **{k: float(v) for k, v in metrics.items()}, "nonfinite_skipped": nonfinite_total,
                    **{f"skipped_{k}": v for k, v in task.skip_counts().items()}}
            metrics_log.write(done, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if train_cfg.eval_every and done % train_cfg.eval_every == 0 and is_main:
            scores = {f"eval_{k}": float(v) for k, v in task.evaluate().items()}
            if scores:
                metrics_log.write(done, scores)
                log.info("%s step %d: %s", task.name, done, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
            model.train()
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
            _save(ckpt, done, task, optimizer, scheduler, ds_engine, is_main)
        _kill_hook(done)
    metrics_log.close()
    if nonfinite_run:
        # The weights that produced these losses are not trustworthy: no export, no summary.
        good = ckpt.finished()
        raise NonFiniteLossError(
            f"{task.name}: the last {nonfinite_run} step(s) gave non-finite losses ({nonfinite_total} in the run); "
            f"the model is not exported. The last good checkpoint stays: "
            f"{good[-1] if good else 'none was written'}. Lower the learning rate or check the data")
    return last


def _save(ckpt: CheckpointManager, step: int, task: StageTask, optimizer, scheduler, ds_engine, is_main: bool):
    bad = [name for name, t in task.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(f"{task.name} step {step}: non-finite weights ({', '.join(bad[:5])}); the "
                                 f"checkpoint is not written, the last good one stays in {ckpt.root}")
    state = {"python_rng": random.getstate(), "numpy_rng": _np_json(np.random.get_state()),
             "data": task.data_state(), "scheduler": scheduler.state_dict() if ds_engine is None else None}
    if ds_engine is not None:  # every rank writes its optimizer partition
        tmp = ckpt.root / f"step-{step:07d}-ds"
        ds_engine.save_checkpoint(str(tmp), tag="state")
        if dist.is_initialized():
            dist.barrier()
    if is_main:
        path = ckpt.save(step, task.state_dict(), None if ds_engine is not None else optimizer, state)
        if ds_engine is not None:
            os.replace(ckpt.root / f"step-{step:07d}-ds", path / "deepspeed")
    if dist.is_initialized():
        dist.barrier()


def _deepspeed_safe_globals() -> list:
    """The plain DeepSpeed types a ZeRO 0-3 checkpoint pickles (loss scaler, stage enum, the
    optimizer's fragment addresses); nothing that can run code."""
    import importlib
    allowed = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer types to allow
            pass
    return allowed


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside (DeepSpeed's own calls, which pass weights_only=False, included)
    runs as weights_only=True, via torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, with only
    `_deepspeed_safe_globals` allowed: a crafted checkpoint cannot run code."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.pop(k, None) for k in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def load_deepspeed_checkpoint(ds_engine, folder: Path) -> None:
    """DeepSpeed's resume, without unpickling: refused with a clear error if a file holds anything
    but tensors and the allowed DeepSpeed types."""
    import pickle
    with weights_only_loads():
        try:
            ds_engine.load_checkpoint(str(folder), tag="state")
        except pickle.UnpicklingError as err:
            raise RuntimeError(f"resume: refusing to unpickle {folder}: it holds an object that is not a tensor or "
                               f"an allowed DeepSpeed type ({str(err).splitlines()[-3:]})") from None


def _np_json(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_state(values: list):
    name, keys, pos, has_gauss, cached = values
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
