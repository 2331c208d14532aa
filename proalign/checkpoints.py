"""Training checkpoints: `<run>/<stage>/checkpoints/step-XXXXXXX/`, written atomically.

Nothing here unpickles: tensors go to safetensors, the rest (step, scheduler, RNG of
python/numpy, data position) to JSON."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import ProalignError
from .storage import WriteError, atomic_write_text, save_tensors

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
