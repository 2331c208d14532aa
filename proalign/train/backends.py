"""Where and how a training run executes: one `Backend` interface (wrap the task, autocast,
backward, optimizer step, checkpoint state) with three implementations: `Plain` (one process),
`DDP` (torch DistributedDataParallel) and `DeepSpeed`. A new backend (FSDP, ...) is one class here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoints import CheckpointManager
from ..config import RunConfig, TrainConfig
from ..distributed import rank_and_world
from .optim import build_optimizer, lr_lambda
from .task import StageTask

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The part of a run config the training loop needs beyond the task: device, precision
    (plain torch/DDP: auto = bf16 autocast on CUDA; DeepSpeed follows its JSON), one CPU thread
    for bitwise-exact resume (`deterministic`), and a DeepSpeed JSON."""
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = True
    deepspeed: Optional[str] = None

    @classmethod
    def of(cls, cfg: RunConfig) -> "Runtime":
        return cls(cfg.device, cfg.precision, cfg.deterministic, cfg.deepspeed)


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
    return rank_and_world()


def join(runtime: Runtime) -> tuple[int, int]:
    """Join the run's process group (if launched as one) before a stage builds anything; (rank, world)."""
    return init_distributed(resolve_device(runtime.device), bool(runtime.deepspeed))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Backend:
    """One training run's execution. `wrap(task)` builds the optimizer and schedule and returns
    the module to call; then per step: `zero_grad`, per micro-batch `micro_batch(last)` +
    `backward`, then `step`. `save_state` / `load_state` write and read a checkpoint's weights,
    optimizer and schedule (every rank calls them)."""

    name = "plain"
    checkpoint_kind: Optional[str] = None  # a checkpoint must hold this sub-folder to resume from

    def __init__(self, runtime: Runtime, device: torch.device):
        self.runtime, self.device = runtime, device
        self.rank, self.world = rank_and_world()
        self.amp_dtype: Optional[torch.dtype] = None
        self.model: Optional[nn.Module] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, task: StageTask) -> nn.Module:
        self.task, self.train_cfg = task, task.train_cfg
        self.params = [p for p in task.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{task.name}: nothing to train (no parameter requires grad)")
        self.optimizer = build_optimizer(self.params, self.train_cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(self.train_cfg.optim, self.train_cfg.steps))
        if self.device.type == "cuda" and self.runtime.precision in ("auto", "bf16"):
            self.amp_dtype = torch.bfloat16
        self.model = self._wrap_model(task)
        return self.model

    def _wrap_model(self, task: StageTask) -> nn.Module:
        return task

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def micro_batch(self, last: bool):
        """Context of one micro-batch's forward and backward (`last`: the step's final one)."""
        return contextlib.nullcontext()

    def prepare(self, batch: dict) -> dict:
        """The batch as the wrapped model takes it (floating tensors in its dtype: a bf16 engine
        gets bf16 inputs); the plain backends autocast instead and change nothing."""
        return batch

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.train_cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.train_cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def scheduler_state(self) -> Optional[dict]:
        return self.scheduler.state_dict()

    def save_state(self, ckpt: CheckpointManager, step: int, tensors: dict, state: dict) -> None:
        if self.is_main:
            ckpt.save(step, tensors, self.optimizer, state)
        _barrier()

    def load_state(self, ckpt: CheckpointManager, latest: Path) -> dict:
        """Weights, optimizer and schedule of checkpoint `latest`; returns its state.json."""
        tensors, state = ckpt.load(latest, self.optimizer)
        self.task.load_training_state(tensors)
        self.scheduler.load_state_dict(state["scheduler"])
        return state

    def follow_configured_schedule(self) -> None:
        """The learning rate of the current config (a resume may change it, or the step count): base
        rates and the rate of the next step follow it; unchanged, this gives the rates restored."""
        lr, scheduler = self.train_cfg.optim.lr, self.scheduler
        scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)


class Plain(Backend):
    """One process (CPU or one GPU)."""


class DDP(Backend):
    """torch DistributedDataParallel; gradients are averaged over ranks once per optimizer step."""

    name = "ddp"

    def _wrap_model(self, task: StageTask) -> nn.Module:
        # frozen submodules are neither broadcast nor synchronised (identical on every rank by construction)
        frozen = tuple(task.frozen_prefixes())
        ignored = [k for k in task.state_dict() if k.startswith(frozen)]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, ignored)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(task, device_ids=device_ids)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()


class DeepSpeed(Backend):
    """DeepSpeed (ZeRO 0-2, bf16 as its JSON says); checkpoints keep its optimizer partitions in
    `<checkpoint>/deepspeed`, read back without unpickling anything but tensors.

    Precision: with bf16 the engine casts the task to bf16 and this backend casts each batch's
    floating inputs to match; modules that accumulate (the EMA teacher: `keeps_float32`) are cast
    back to float32 and stay outside the cast. Accumulation is proalign's `train.accum_steps`,
    counted in optimizer steps: the engine is told the same count, each micro-batch's loss is
    backpropagated unscaled (the accumulated micro-losses already sum to the batch's gradient), and
    the engine steps its optimizer, schedule and step count at the boundary only."""

    name = "deepspeed"
    checkpoint_kind = "deepspeed"

    def wrap(self, task: StageTask) -> nn.Module:
        model = super().wrap(task)
        self.amp_dtype = None  # the engine casts the task itself; `prepare` casts the inputs
        self.input_dtype = next(p.dtype for p in self.engine.module.parameters() if p.requires_grad)
        for module in task.modules():
            if getattr(module, "keeps_float32", False):
                module.float()
        self._last_micro_batch = True
        return model

    def _wrap_model(self, task: StageTask) -> nn.Module:
        import deepspeed
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=task, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(self.runtime.deepspeed, self.train_cfg, self.device))
        return self.engine

    def prepare(self, batch: dict) -> dict:
        if self.input_dtype == torch.float32:
            return batch
        return {k: v.to(self.input_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in batch.items()}

    def micro_batch(self, last: bool):
        self._last_micro_batch = last
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        pass  # the engine clears gradients in its step

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self._last_micro_batch:
            self.engine.step()  # a micro-step: the engine only counts it

    def step(self) -> None:
        self.engine.step()  # the boundary: optimizer, schedule, step count

    def scheduler_state(self) -> Optional[dict]:
        return None

    def save_state(self, ckpt: CheckpointManager, step: int, tensors: dict, state: dict) -> None:
        tmp = ckpt.root / f"step-{step:07d}-ds"
        self.engine.save_checkpoint(str(tmp), tag="state")  # every rank writes its optimizer partition
        _barrier()
        if self.is_main:
            path = ckpt.save(step, tensors, None, state)
            os.replace(tmp, path / "deepspeed")
        _barrier()

    def load_state(self, ckpt: CheckpointManager, latest: Path) -> dict:
        tensors, state = ckpt.load(latest, None)
        self.task.load_training_state(tensors)
        load_deepspeed_checkpoint(self.engine, latest / "deepspeed")
        return state


def make_backend(runtime: Runtime, task_name: str) -> Backend:
    """The backend this process runs: DeepSpeed when configured (and installed), else DDP under a
    multi-process launch, else Plain. Joins the process group."""
    device = resolve_device(runtime.device)
    use_ds = bool(runtime.deepspeed)
    if use_ds:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            log.warning("deepspeed not installed: running %s in plain torch", task_name)
            use_ds = False
    _, world = init_distributed(device, use_ds)
    if use_ds:
        return DeepSpeed(runtime, device)
    return DDP(runtime, device) if world > 1 else Plain(runtime, device)


def deepspeed_config(path: str, train: TrainConfig, device: torch.device) -> dict:
    """The JSON as written (bf16 included, on CPU too: DeepSpeed's CPU accelerator runs it), with
    the batch and the accumulation from the stage's `train` section (the config check refuses a
    JSON that sets them otherwise)."""
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config["gradient_accumulation_steps"] = train.accum_steps
    config.pop("train_batch_size", None)
    if train.optim.grad_clip:
        config["gradient_clipping"] = train.optim.grad_clip
    config["zero_allow_untested_optimizer"] = True
    return config


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
