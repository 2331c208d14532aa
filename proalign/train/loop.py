"""The one training loop shared by every stage: steps with gradient accumulation, a non-finite
loss policy, periodic eval, atomic checkpoints and exact resume, metrics and a progress bar, and
a clean stop on SIGTERM/SIGINT. The backend (proalign/train/backends.py) does the rest."""
from __future__ import annotations

import contextlib
import logging
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import NonFiniteLossError, ProalignError
from .backends import Backend, Runtime, make_backend
from .metrics import MetricsLog
from .checkpoints import CheckpointManager, check_resume_config, resume_latest, save_checkpoint
from .task import StageTask

log = logging.getLogger(__name__)

# Called as hook(step) after every finished optimizer step (its checkpoint written), in every run
# of this process, after the `hooks` a caller passes: how launchers and tests stop a run at a step.
STEP_HOOKS: list[Callable[[int], None]] = []


class TrainingInterrupted(ProalignError):
    """SIGTERM or SIGINT stopped a run after a finished step and a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(task: StageTask, runtime: Runtime, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          hooks: Iterable[Callable[[int], None]] = (), config: Optional[dict] = None) -> dict:
    """Run `task.train_cfg.steps` optimizer steps of `task` in `run_dir/<task name>/`; returns the
    last logged metrics. `config` (the run config as a mapping) is recorded with every checkpoint,
    and a resumed run's config is checked against it."""
    run_dir = Path(run_dir)
    backend = make_backend(runtime, task.name)
    ckpt = CheckpointManager(run_dir / task.name)
    if resume and config is not None:  # before anything is written: a refused resume leaves the run as it was
        check_resume_config(config, ckpt, task.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    task.to(backend.device)
    threads = torch.get_num_threads()
    if runtime.deterministic and backend.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        backend.wrap(task)
        run = _Run(task, backend, ckpt, run_dir, config, (*hooks, *STEP_HOOKS))
        if resume:
            _resume(run)
        return _loop(run, progress)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """One training run's state."""
    task: StageTask
    backend: Backend
    ckpt: CheckpointManager
    run_dir: Path
    config: Optional[dict]
    hooks: tuple
    start_step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    received: Optional[list] = None  # stop signals received (see _stop_signals)


class _StopMidStep(Exception):
    """A stop asked for between the micro-batches of one step: the step is abandoned."""


def _resume(run: _Run) -> None:
    run.start_step = resume_latest(run.task, run.backend, run.ckpt)


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


def _max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (each rank's own value in one process): what the ranks
    decide together, so that all of them take the same branch into the next collective."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([value], dtype=torch.long)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
    return value


def _stop_requested(received: list[int]) -> int:
    """The signal that asked to stop (0: none); under data parallelism the ranks agree, so that all
    of them write the checkpoint together."""
    return _max_over_ranks(received[0] if received else 0)


def _loop(run: _Run, progress: bool) -> dict:
    from tqdm.auto import tqdm
    task, steps, is_main = run.task, run.task.train_cfg.steps, run.backend.is_main
    metrics_log = MetricsLog(run.run_dir, is_main, task.name, run.start_step)
    bar = tqdm(range(run.start_step, steps), initial=run.start_step, total=steps, desc=task.name,
               disable=not (progress and is_main), unit="step")
    run.backend.model.train()
    with _stop_signals() as received:
        run.received = received
        return _steps(run, bar, metrics_log, received)


def _steps(run: _Run, bar, metrics_log: MetricsLog, received: list[int]) -> dict:
    task, train_cfg, backend = run.task, run.task.train_cfg, run.backend
    last: dict = {}
    last_saved = run.start_step
    for step in bar:
        # checked before every step, on every rank alike (a skipped non-finite step included), and
        # between the micro-batches of an accumulated step
        signum, mid_step, result = _stop_requested(received), False, None
        if not signum:
            try:
                result = _forward_backward(run, step)
            except _StopMidStep:  # its batches are drawn: the data position is past them, so no new checkpoint
                signum, mid_step = _stop_requested(received), True
        if signum:
            if step > last_saved and not mid_step:
                _save(run, step)
            metrics_log.close()
            bar.close()
            saved = last_saved if mid_step else step
            where = (f"checkpoint {run.ckpt.root / f'step-{saved:07d}'}. Resume: the same command with --resume"
                     if saved else "nothing to resume from yet")
            during = f"during step {step + 1}, after step {step}" if mid_step else f"after step {step}"
            raise TrainingInterrupted(f"{task.name}: stopped by {signal.Signals(signum).name} {during}; "
                                      f"{where}", signum)
        if result is None:  # non-finite loss: skipped and counted
            continue
        loss, metrics = result
        backend.step()
        task.after_step()
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            last = {"loss": loss.item(), "lr": backend.lr,
                    **{k: float(v) for k, v in metrics.items()}, "nonfinite_skipped": run.nonfinite_total,
                    **{f"skipped_{k}": v for k, v in task.skip_counts().items()}}
            metrics_log.write(done, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if train_cfg.eval_every and done % train_cfg.eval_every == 0:
            # on every rank, so that none waits for rank 0's eval in the next step's collectives
            # (past NCCL's timeout, on a long eval); rank 0 reports
            _evaluate(run, metrics_log, done)
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
            _save(run, done)
            last_saved = done
        for hook in run.hooks:
            hook(done)
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
    """The non-finite policy: a non-finite loss is skipped and counted; too many in a row abort.
    The ranks decide together: one rank's non-finite loss skips the step on every rank (a rank
    that skipped alone would leave the others waiting in the gradient all-reduce)."""
    here = not bool(torch.isfinite(loss))
    if not _max_over_ranks(int(here)):
        run.nonfinite_run = 0
        return True
    run.nonfinite_total += 1
    run.nonfinite_run += 1
    log.warning("%s step %d: non-finite loss %s skipped (%d so far)", run.task.name, step,
                loss.item() if here else "on another rank", run.nonfinite_total)
    if run.nonfinite_run >= run.task.train_cfg.max_nonfinite_steps:
        raise NonFiniteLossError(f"{run.task.name}: {run.nonfinite_run} consecutive non-finite losses at step "
                                 f"{step}; lower the learning rate or check the data")
    run.backend.optimizer.zero_grad(set_to_none=True)
    return False


def _forward_backward(run: _Run, step: int):
    """(loss, metrics) of one optimizer step's batch, gradients computed; None if the loss is not
    finite (nothing is backpropagated). With `train.accum_steps` = k > 1, k micro-batches are drawn,
    their features computed once without grad, then each micro-batch is recomputed with grad
    against the others' features and backpropagated (DDP synchronises on the last only)."""
    task, backend, k = run.task, run.backend, run.task.train_cfg.accum_steps
    batches = [backend.prepare(task.next_batch()) for _ in range(k)]
    cached = None
    if k > 1:
        with torch.no_grad(), backend.autocast():
            cached = [task.features(batch) for batch in batches]
    backend.zero_grad()
    for index, batch in enumerate(batches):
        if index and run.received is not None and _stop_requested(run.received):
            raise _StopMidStep  # every rank asks at the same micro-batch: they agree
        with backend.micro_batch(last=index == k - 1):
            with backend.autocast():
                loss, metrics = backend.model(batch, (cached, index)) if cached else backend.model(batch)
            if index == 0 and not _finite_or_skip(run, loss, step):
                return None
            backend.backward(loss)
    return loss, metrics


def _evaluate(run: _Run, metrics_log: MetricsLog, done: int) -> None:
    scores = {f"eval_{k}": float(v) for k, v in run.task.evaluate().items()}
    if scores and run.backend.is_main:
        metrics_log.write(done, scores)
        log.info("%s step %d: %s", run.task.name, done, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    run.backend.model.train()


def _save(run: _Run, step: int) -> None:
    save_checkpoint(run.task, run.backend, run.ckpt, run.config, step)