"""What a checkpoint holds besides weights and optimizer: RNG states, the data position and the
run config, and the check of a resumed run's config against the one its checkpoint recorded."""
from __future__ import annotations

import json
import logging
import random

import numpy as np

from ..checkpoints import CheckpointManager
from ..errors import ConfigError

log = logging.getLogger(__name__)


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
