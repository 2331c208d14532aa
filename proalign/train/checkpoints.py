"""Checkpoints, in one place: what is saved, where, how atomically, and how a run resumes.

Where: `<run>/<stage>/checkpoints/step-XXXXXXX/` (the `latest` file names the newest finished
one; the two newest are kept). Each is written into a temporary folder and renamed into place, so a
crash leaves the previous one whole.

What: the trained tensors (`task.training_state()`: frozen modules are in no checkpoint, and
non-finite weights are never written) in safetensors; the optimizer's tensors in safetensors and
its other values in JSON; in `state.json`, the step, the scheduler, the RNG states (python, numpy,
torch), the data position (each reader's position: proalign/data/stream.py), the run config and
the reader layout (ranks x data.num_workers). Nothing is unpickled on load. Under DeepSpeed the
backend adds the engine's own files beside them (`Backend.save_state` / `load_state`), loaded
weights-only.

Resume: `check_resume_config` compares the config with the one the latest checkpoint recorded
(learning rate, step count, warm-up and logging intervals may change; anything else, and another
reader layout, is refused), then `resume_latest` restores weights, optimizer, schedule, RNGs and
the data position.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import ConfigError, NonFiniteLossError, ProalignError
from ..storage import WriteError, atomic_write_text, save_tensors

log = logging.getLogger(__name__)
_FINISHED = re.compile(r"step-\d{7}")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointManager:
    """`<run>/checkpoints/step-XXXXXXX/{model,optimizer,rng}.safetensors + state.json`, plus `latest`."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def finished(self, require: str | None = None) -> list[Path]:
        """Complete checkpoints, oldest first: `step-XXXXXXX` folders with their state.json (and the
        `require`d subfolder, e.g. `deepspeed`). Temporary folders never count."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.is_dir() and _FINISHED.fullmatch(p.name) and (p / "state.json").exists()
                      and (require is None or (p / require).is_dir()))

    def latest(self, require: str | None = None) -> Path | None:
        """The checkpoint `latest` names; if it is incomplete (or lacks `require`), the newest
        complete one, with a warning saying so."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        named = self.root / pointer.read_text().strip()
        if named in self.finished(require):
            return named
        done = self.finished(require)
        what = f"state.json{' and ' + require + '/' if require else ''}"
        if not done:
            raise FileNotFoundError(f"{pointer} names {named}, which lacks {what}, and no other complete "
                                    f"checkpoint is in {self.root}")
        log.warning("resume: %s lacks %s; falling back to the newest complete checkpoint %s", named, what, done[-1])
        return done[-1]

    def save(self, step: int, model_tensors: dict, optimizer: torch.optim.Optimizer | None, state: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:07d}"
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write(tmp, step, model_tensors, optimizer, state)
        except (OSError, WriteError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            done = self.finished()
            reason = err.reason if isinstance(err, WriteError) else err.strerror or str(err)
            raise ProalignError(f"checkpoint {self.root / name}: cannot write it ({reason}); the last complete "
                                f"checkpoint is {done[-1] if done else 'none'}") from None
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.root / "latest", name)
        self._prune(final)
        return final

    @staticmethod
    def _write(tmp: Path, step: int, model_tensors: dict, optimizer, state: dict) -> None:
        tmp.mkdir()
        save_tensors(model_tensors, tmp / "model.safetensors")
        if optimizer is not None:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            save_tensors(opt_tensors, tmp / "optimizer.safetensors")
            state = {**state, "optimizer": opt_meta}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_tensors(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1, default=str))

    def _prune(self, current: Path) -> None:
        for old in self.finished()[:-self.keep]:
            if old != current:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: Path, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
        """Return (model tensors, state); restores optimizer and RNG in place."""
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        if optimizer is not None and (path / "optimizer.safetensors").exists():
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
            optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        return tensors, state


def rng_state() -> dict:
    """Python's and numpy's RNG states as JSON values."""
    return {"python_rng": random.getstate(), "numpy_rng": _np_json(np.random.get_state())}


def restore_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python_rng"]))
    np.random.set_state(_np_state(state["numpy_rng"]))


# --resume with a changed config: fields applied from the checkpoint on (and said), per stage; the
# other stages' sections do not matter to this one; any other change is refused.
_RESUME_APPLIES = ("output_dir", "device", "precision", "deterministic", "data.cache_dir",
                   "eval.*", "hub.*", "{stage}.train.steps", "{stage}.train.optim.lr", "{stage}.train.optim.warmup_steps",
                   "{stage}.train.log_every", "{stage}.train.checkpoint_every", "{stage}.train.eval_every",
                   "{stage}.train.max_nonfinite_steps", "coop.lr", "coop.epochs", "coop.log_every")
_STAGE_SECTIONS = ("teacher", "stage1", "stage2", "coop")


def data_layout(config: dict, world: int) -> dict:
    """The reader layout a data position belongs to: ranks and DataLoader workers per rank (each
    reader takes its own part of every epoch, so another layout reads other samples)."""
    workers = int((config or {}).get("data", {}).get("num_workers", 0) or 0)
    return {"world_size": int(world), "readers_per_rank": max(1, workers)}


def _check_layout(state: dict, config: dict, where) -> None:
    import os
    stored = state.get("layout")
    if not stored:
        return
    here = data_layout(config, int(os.environ.get("WORLD_SIZE", "1")))
    if stored != here:
        raise ConfigError(
            f"--resume: {where} was written by {stored['world_size']} rank(s) x {stored['readers_per_rank']} "
            f"reader(s) each; this run has {here['world_size']} rank(s) x {here['readers_per_rank']} (data.num_workers, "
            "or 1 without workers). Its data position belongs to that layout: resuming on another would re-read "
            "samples already trained on and skip others. Resume with the same ranks and data.num_workers, or start "
            "a new run")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def check_resume_config(config: dict, ckpt: CheckpointManager, stage: str) -> list[str]:
    """Compare the config a run resumes with against the one its latest checkpoint was written with:
    changes that only steer the rest of the run (learning rate, step count, logging, ...) are
    applied and logged; any that would change what the run computes so far (shapes, data, seeds,
    batch size, ...) raise a ConfigError listing them. `config` is the run config as a mapping
    (`config_to_dict`). Returns the applied fields."""
    import fnmatch
    latest = ckpt.finished()
    if not latest:
        return []
    try:
        state = json.loads((latest[-1] / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []  # the resume itself reports an unreadable checkpoint
    stored = state.get("config")
    _check_layout(state, config, latest[-1])
    if not stored:
        log.info("--resume: %s predates stored configs; changes are not checked", latest[-1])
        return []
    old, new = _flat(stored), _flat(json.loads(json.dumps(config, default=str)))
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


def save_checkpoint(task, backend, ckpt: CheckpointManager, config: dict, step: int) -> None:
    """The checkpoint of `step` of a `StageTask` trained by a `Backend` (proalign/train/backends.py,
    which writes its own files beside proalign's); the module's docstring says what it holds."""
    tensors = task.training_state()
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(f"{task.name} step {step}: non-finite weights ({', '.join(bad[:5])}); the "
                                 f"checkpoint is not written, the last good one stays in {ckpt.root}")
    state = {**rng_state(), "data": task.data_state(), "scheduler": backend.scheduler_state(),
             "config": config, "layout": data_layout(config, backend.world)}
    backend.save_state(ckpt, step, tensors, state)


def resume_latest(task, backend, ckpt: CheckpointManager) -> int:
    """Weights, optimizer, schedule, RNGs and the data position of the latest checkpoint; the step
    it reached (0: none yet, the run starts from scratch)."""
    latest = ckpt.latest(require=backend.checkpoint_kind)
    if latest is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt.root)
        return 0
    state = backend.load_state(ckpt, latest)
    backend.follow_configured_schedule()
    restore_rng_state(state)
    task.load_data_state(state.get("data", {}))
    log.info("resumed %s from %s (step %d)", task.name, latest, state["step"])
    return int(state["step"])
