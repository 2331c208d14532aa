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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError, OptimConfig, RunConfig, TrainConfig, config_to_dict, save_config
from .errors import ProalignError
from .checkpoints import CheckpointManager

log = logging.getLogger(__name__)


class NonFiniteLossError(ProalignError, RuntimeError):
    pass


class StageTask(nn.Module, abc.ABC):
    """Interface a stage implements; the engine owns everything else."""

    name = "stage"

    @abc.abstractmethod
    def next_batch(self) -> dict:
        """The next training batch (moved to the device by `forward`)."""

    def features(self, batch: dict) -> dict:
        """The batch's features: tensors with one row per sample, or scalars (a logit scale)."""
        raise NotImplementedError(f"{self.name} does not split its loss into features and loss, so it "
                                  f"cannot accumulate gradients (train.accum_steps)")

    def loss(self, features: dict):
        """(loss, metrics) from `features`."""
        raise NotImplementedError

    def forward(self, batch: dict, accumulated: Optional[tuple[list[dict], int]] = None):
        """(loss, metrics) of the batch. With `accumulated` = (every micro-batch's features computed
        without grad, this batch's place j among them), the loss is that of the whole accumulated
        batch, with gradient through micro-batch j alone (open_clip's `accum_freq`): InfoNCE
        negatives and structure pairs span every micro-batch."""
        features = self.features(batch)
        if accumulated is not None:
            features = merge_accumulated(features, *accumulated)
        return self.loss(features)

    def after_step(self) -> None:
        """Called after every optimizer step (EMA update, clamping)."""

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        """Restore the data position saved by `data_state`."""

    def skip_counts(self) -> dict:
        return {}

    train_cfg: TrainConfig  # steps, batch size, schedule: the one source of both

    def evaluate(self) -> dict:
        """Held-out metrics, run on rank 0 every `train.eval_every` steps (none by default)."""
        return {}

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of the frozen submodules (all parameters without grad), except
        those that change outside the optimizer and say so (`updated_outside_optimizer`: the EMA
        teacher). A frozen embedder, or a CoOp head's frozen adapter, lands here."""
        found: list[str] = []

        def visit(module: nn.Module, prefix: str) -> None:
            if getattr(module, "updated_outside_optimizer", False):
                return
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                found.append(prefix)
                return
            for name, child in module.named_children():
                visit(child, f"{prefix}{name}.")
        for name, child in self.named_children():
            visit(child, f"{name}.")
        return found

    def training_state(self) -> dict[str, torch.Tensor]:
        """What checkpoints and replica checksums hold: the state dict without frozen submodules."""
        frozen = tuple(self.frozen_prefixes())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        expected, frozen = set(self.training_state()), tuple(self.frozen_prefixes())
        tensors = {k: v for k, v in tensors.items() if not k.startswith(frozen)}  # older checkpoints held them
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise KeyError(f"{self.name}: checkpoint does not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.load_state_dict(tensors, strict=False)


def merge_accumulated(live: dict, cached: list[dict], index: int) -> dict:
    """Micro-batch `index`'s live features in place of its cached copy, the others cached (no grad).
    Scalars (a logit scale) keep their gradient on the first micro-batch only, so that summing the
    micro-batches' gradients gives the whole batch's gradient exactly once."""
    merged = {}
    for key, value in live.items():
        if value.dim() == 0 or (value.dim() == 1 and value.numel() == 1):
            merged[key] = value if index == 0 else value.detach()
        else:
            merged[key] = torch.cat([value if i == index else part[key] for i, part in enumerate(cached)])
    return merged


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
    """`metrics.jsonl` (one row per logged step of each stage) and TensorBoard. A run starting at
    `start_step` (0: fresh; a resume: its checkpoint's step) first drops this stage's rows after
    that step, which it is about to log again: one row per step after any kills and resumes."""

    def __init__(self, run_dir: Path, enabled: bool, stage: str, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.stage = stage
        self.tb = None
        if enabled and self.path.exists():
            self._drop_rows_after(start_step)
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard" / stage))
            except ImportError:  # tensorboard is optional
                log.warning("tensorboard not installed: TensorBoard events are not written")

    def _drop_rows_after(self, step: int) -> None:
        from .storage import atomic_write_text
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)

        def replayed(line: str) -> bool:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False  # not ours to judge: kept as it is
            return isinstance(row, dict) and row.get("stage") == self.stage and row.get("step", 0) > step
        kept = [line for line in lines if not replayed(line)]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))

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


class TrainingInterrupted(ProalignError):
    """SIGTERM or SIGINT stopped a run after a finished step and a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _stop_signals():
    """SIGTERM (a scheduler's notice before preemption) and SIGINT (Ctrl-C) ask the loop to stop
    after the step in progress; a second Ctrl-C stops at once. The previous handlers come back
    after the run. Only the main thread can take signals; elsewhere nothing is installed."""
    import threading
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def ask_to_stop(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("%s received: finishing this step, then a checkpoint", signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_requested(received: list[int]) -> int:
    """The signal that asked to stop (0: none); under data parallelism the ranks agree, so that all
    of them write the checkpoint together."""
    asked = received[0] if received else 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([asked], dtype=torch.long)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = int(flag.item())
    return asked


def _kill_hook(step: int) -> None:
    """Test hook: PROALIGN_KILL_AT_STEP=N sends SIGKILL to this process after step N."""
    target = os.environ.get("PROALIGN_KILL_AT_STEP")
    if target and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def train(task: StageTask, cfg: RunConfig, run_dir: str | Path, resume: bool = False,
          device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """Run `task.train_cfg.steps` optimizer steps of `task`; returns the last logged metrics."""
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
    if resume:  # before anything is written: a refused resume leaves the run folder as it was
        check_resume_config(cfg, CheckpointManager(run_dir / task.name), task.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    task.to(device)
    threads = torch.get_num_threads()
    if cfg.deterministic and device.type == "cpu":
        torch.set_num_threads(1)
    try:
        run = _setup(task, cfg, run_dir, device, use_ds, rank, world)
        if resume:
            _resume(run)
        return _loop(run, progress)
    finally:
        torch.set_num_threads(threads)


# --resume with a changed config: fields applied from the checkpoint on (and said), per stage; the
# other stages' sections do not matter to this one; any other change is refused.
_RESUME_APPLIES = ("output_dir", "device", "precision", "deterministic", "data.num_workers", "data.cache_dir",
                   "eval.*", "hub.*", "{stage}.train.steps", "{stage}.train.optim.lr", "{stage}.train.optim.warmup_steps",
                   "{stage}.train.log_every", "{stage}.train.checkpoint_every", "{stage}.train.eval_every",
                   "{stage}.train.max_nonfinite_steps", "coop.lr", "coop.epochs", "coop.log_every")
_STAGE_SECTIONS = ("teacher", "stage1", "stage2", "coop")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def check_resume_config(cfg: RunConfig, ckpt: CheckpointManager, stage: str) -> list[str]:
    """Compare the config a run resumes with against the one its latest checkpoint was written with:
    changes that only steer the rest of the run (learning rate, step count, logging, ...) are
    applied and logged; any that would change what the run computes so far (shapes, data, seeds,
    batch size, ...) raise a ConfigError listing them. Returns the applied fields."""
    import fnmatch
    latest = ckpt.finished()
    if not latest:
        return []
    try:
        stored = json.loads((latest[-1] / "state.json").read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return []  # the resume itself reports an unreadable checkpoint
    if not stored:
        log.info("--resume: %s predates stored configs; changes are not checked", latest[-1])
        return []
    old, new = _flat(stored), _flat(json.loads(json.dumps(config_to_dict(cfg), default=str)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    others = tuple(f"{s}." for s in _STAGE_SECTIONS if s != stage)
    applies = [p.format(stage=stage) for p in _RESUME_APPLIES]
    applied, refused = [], []
    for key in changed:
        if key.startswith(others):
            continue
        shown = f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}"
        (applied if any(fnmatch.fnmatchcase(key, p) for p in applies) else refused).append(shown)
    if refused:
        raise ConfigError(f"--resume: the config changed since {latest[-1]} in ways the resumed run cannot "
                          f"take: {'; '.join(refused[:8])}{'; ...' if len(refused) > 8 else ''}. Put them back, or "
                          "start a new run (another output_dir, or without --resume)")
    for line in applied:
        log.warning("--resume: %s (applied)", line)
    return applied


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _Run:
    """Everything one training run holds, built by `_setup`."""
    task: StageTask
    train_cfg: TrainConfig
    model: nn.Module               # the task, or its DDP/DeepSpeed wrapper
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    ds_engine: object
    ckpt: CheckpointManager
    run_dir: Path
    is_main: bool
    start_step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    amp_dtype: Optional[torch.dtype] = None  # autocast in the plain torch/DDP path (bf16 on CUDA)
    config: Optional[dict] = None  # the resolved run config, saved with every checkpoint

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)


def _setup(task: StageTask, cfg: RunConfig, run_dir: Path, device, use_ds: bool, rank: int, world: int) -> _Run:
    train_cfg = task.train_cfg
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
        # frozen submodules are neither broadcast nor synchronised (identical on every rank by construction)
        frozen = tuple(task.frozen_prefixes())
        ignored = [k for k in task.state_dict() if k.startswith(frozen)]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, ignored)
        model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
    if train_cfg.accum_steps > 1 and use_ds:
        from .config import ConfigError
        raise ConfigError(f"{task.name}.train.accum_steps: not with DeepSpeed; set gradient_accumulation_steps in "
                          f"{cfg.deepspeed} (DeepSpeed's micro-batches each use their own negatives)")
    amp = None
    if not use_ds and device.type == "cuda" and cfg.precision in ("auto", "bf16"):
        amp = torch.bfloat16  # DeepSpeed has its own bf16 (the JSON's "bf16" section)
    return _Run(task, train_cfg, model, params, optimizer, scheduler, ds_engine, CheckpointManager(run_dir / task.name),
                run_dir, rank == 0, amp_dtype=amp, config=config_to_dict(cfg))


def _resume(run: _Run) -> None:
    """Weights, optimizer, scheduler, RNGs and the data position of the latest checkpoint."""
    latest = run.ckpt.latest(require="deepspeed" if run.ds_engine is not None else None)
    if latest is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", run.ckpt.root)
        return
    tensors, state = run.ckpt.load(latest, None if run.ds_engine is not None else run.optimizer)
    run.task.load_training_state(tensors)
    if run.ds_engine is not None:
        load_deepspeed_checkpoint(run.ds_engine, latest / "deepspeed")
    else:
        run.scheduler.load_state_dict(state["scheduler"])
    _follow_configured_schedule(run)
    random.setstate(_tuples(state["python_rng"]))
    np.random.set_state(_np_state(state["numpy_rng"]))
    run.task.load_data_state(state.get("data", {}))
    run.start_step = state["step"]
    log.info("resumed %s from %s (step %d)", run.task.name, latest, run.start_step)


def _follow_configured_schedule(run: _Run) -> None:
    """The learning rate of the current config (a resume may change it, or the step count): base
    rates and the rate of the next step follow it; unchanged, this gives the rates restored."""
    lr, scheduler = run.train_cfg.optim.lr, run.scheduler
    scheduler.base_lrs = [lr for _ in run.optimizer.param_groups]
    for group, factor in zip(run.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)


def _loop(run: _Run, progress: bool) -> dict:
    from tqdm.auto import tqdm
    task, train_cfg = run.task, run.train_cfg
    metrics_log = JsonlLogger(run.run_dir, run.is_main, task.name, run.start_step)
    bar = tqdm(range(run.start_step, train_cfg.steps), initial=run.start_step, total=train_cfg.steps,
               desc=task.name, disable=not (progress and run.is_main), unit="step")
    run.model.train()
    with _stop_signals() as received:
        return _steps(run, bar, metrics_log, received)


def _steps(run: _Run, bar, metrics_log: "JsonlLogger", received: list[int]) -> dict:
    task, train_cfg = run.task, run.train_cfg
    last: dict = {}
    last_saved = run.start_step
    for step in bar:
        # checked before every step, on every rank alike (a skipped non-finite step included)
        signum = _stop_requested(received)
        if signum:
            if step > last_saved:
                _save(run.ckpt, step, task, run.optimizer, run.scheduler, run.ds_engine, run.is_main, run.config)
            metrics_log.close()
            bar.close()
            where = (f"checkpoint {run.ckpt.root / f'step-{step:07d}'}. Resume: the same command with --resume"
                     if step else "nothing to resume from yet")
            raise TrainingInterrupted(f"{task.name}: stopped by {signal.Signals(signum).name} after step {step}; "
                                      f"{where}", signum)
        result = _forward_backward(run, step)
        if result is None:  # non-finite loss: skipped and counted
            continue
        loss, metrics = result
        _optimizer_step(run)
        task.after_step()
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            last = {"loss": loss.item(), "lr": run.optimizer.param_groups[0]["lr"],
                    **{k: float(v) for k, v in metrics.items()}, "nonfinite_skipped": run.nonfinite_total,
                    **{f"skipped_{k}": v for k, v in task.skip_counts().items()}}
            metrics_log.write(done, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if train_cfg.eval_every and done % train_cfg.eval_every == 0 and run.is_main:
            _evaluate(run, metrics_log, done)
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
            _save(run.ckpt, done, task, run.optimizer, run.scheduler, run.ds_engine, run.is_main, run.config)
            last_saved = done
        _kill_hook(done)
    metrics_log.close()
    if run.nonfinite_run:
        # The weights that produced these losses are not trustworthy: no export, no summary.
        good = run.ckpt.finished()
        raise NonFiniteLossError(
            f"{task.name}: the last {run.nonfinite_run} step(s) gave non-finite losses ({run.nonfinite_total} in the "
            f"run); the model is not exported. The last good checkpoint stays: "
            f"{good[-1] if good else 'none was written'}. Lower the learning rate or check the data")
    return last


def _finite_or_skip(run: _Run, loss: torch.Tensor, step: int) -> bool:
    """The non-finite policy: a non-finite loss is skipped and counted; too many in a row abort."""
    if torch.isfinite(loss):
        run.nonfinite_run = 0
        return True
    run.nonfinite_total += 1
    run.nonfinite_run += 1
    log.warning("%s step %d: non-finite loss %s skipped (%d so far)", run.task.name, step, loss.item(),
                run.nonfinite_total)
    if run.nonfinite_run >= run.train_cfg.max_nonfinite_steps:
        raise NonFiniteLossError(f"{run.task.name}: {run.nonfinite_run} consecutive non-finite losses at step "
                                 f"{step}; lower the learning rate or check the data")
    run.optimizer.zero_grad(set_to_none=True)
    return False


def _forward_backward(run: _Run, step: int):
    """(loss, metrics) of one optimizer step's batch, gradients computed; None if the loss is not
    finite (nothing is backpropagated). With `train.accum_steps` = k > 1, k micro-batches are drawn,
    their features computed once without grad, then each micro-batch is recomputed with grad
    against the others' features and backpropagated (DDP synchronises on the last only)."""
    task, k = run.task, run.train_cfg.accum_steps
    batches = [task.next_batch() for _ in range(k)]
    cached = None
    if k > 1:
        with torch.no_grad(), run.autocast():
            cached = [task.features(batch) for batch in batches]
    if run.ds_engine is None:
        run.optimizer.zero_grad(set_to_none=True)
    for index, batch in enumerate(batches):
        last = index == k - 1
        sync = run.model.no_sync() if isinstance(run.model, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with run.autocast():
                loss, metrics = run.model(batch, (cached, index)) if cached else run.model(batch)
            if index == 0 and not _finite_or_skip(run, loss, step):
                return None
            if run.ds_engine is not None:
                run.ds_engine.backward(loss)
            else:
                loss.backward()
    return loss, metrics


def _optimizer_step(run: _Run) -> None:
    if run.ds_engine is not None:
        run.ds_engine.step()
        return
    if run.train_cfg.optim.grad_clip:
        nn.utils.clip_grad_norm_(run.params, run.train_cfg.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()


def _evaluate(run: _Run, metrics_log: JsonlLogger, done: int) -> None:
    scores = {f"eval_{k}": float(v) for k, v in run.task.evaluate().items()}
    if scores:
        metrics_log.write(done, scores)
        log.info("%s step %d: %s", run.task.name, done, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    run.model.train()


def _save(ckpt: CheckpointManager, step: int, task: StageTask, optimizer, scheduler, ds_engine, is_main: bool,
          config: Optional[dict] = None):
    tensors = task.training_state()
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(f"{task.name} step {step}: non-finite weights ({', '.join(bad[:5])}); the "
                                 f"checkpoint is not written, the last good one stays in {ckpt.root}")
    state = {"python_rng": random.getstate(), "numpy_rng": _np_json(np.random.get_state()),
             "data": task.data_state(), "scheduler": scheduler.state_dict() if ds_engine is None else None,
             "config": config}
    if ds_engine is not None:  # every rank writes its optimizer partition
        tmp = ckpt.root / f"step-{step:07d}-ds"
        ds_engine.save_checkpoint(str(tmp), tag="state")
        if dist.is_initialized():
            dist.barrier()
    if is_main:
        path = ckpt.save(step, tensors, None if ds_engine is not None else optimizer, state)
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
