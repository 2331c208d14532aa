"""What the stage drivers share: the resumable image-text batches, run summaries, rank checks."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import IterableDataset

from ..config import DataConfig, RunConfig, config_to_dict, save_config
from ..data.captions import CaptionSpec
from ..data.shards import ImageTextStream
from ..data.stream import Batcher
from ..distributed import is_main
from ..models.towers import state_fingerprint
from ..train import Runtime, StageTask, join, train


class StreamBatches:
    """Batches from a training stream (the shards' image-text stream, or cached features), with a
    resumable position (each reader's place in its epoch, proalign/data/stream.py). Streaming
    tasks mix this in."""

    def _init_stream(self, data: DataConfig, preprocess, batch_size: int, seed: int, shard_features=None):
        self._use_stream(ImageTextStream(data.train_shards, preprocess, data.train_languages, seed=seed,
                                         shard_features=shard_features, captions=CaptionSpec(data.captions),
                                         shard_index=getattr(shard_features, "index", None),
                                         resampled=data.resampled,
                                         samples_per_epoch=data.samples_per_epoch),
                         batch_size, data.num_workers)

    def _use_stream(self, stream: IterableDataset, batch_size: int, num_workers: int = 0):
        self._stream = stream
        self._batch_size, self._workers = batch_size, num_workers
        self._start_position: dict = {}
        self._batcher: Optional[Batcher] = None

    def _next_stream_batch(self) -> dict:
        if self._batcher is None:
            self._batcher = Batcher(self._stream, self._batch_size, self._workers, self._start_position)
        return self._batcher.next_batch()

    def data_state(self) -> dict:
        return self._batcher.position() if self._batcher else dict(self._start_position)

    def load_data_state(self, state: dict) -> None:
        self._start_position = dict(state)
        self._batcher = None

    def skip_counts(self) -> dict:
        return dict(self._batcher.skips) if self._batcher else {}


def write_run_config(cfg: RunConfig, stage: Optional[str] = None, resume: bool = False) -> None:
    """`<output_dir>/config.yaml`, the resolved config of a command, written once by the launch's
    rank 0 before the stage runs. A resume is checked first against the stage's latest checkpoint:
    a refused one writes nothing."""
    import os
    from ..train.checkpoints import CheckpointManager, check_resume_config
    if resume and stage:
        check_resume_config(config_to_dict(cfg), CheckpointManager(Path(cfg.output_dir) / stage), stage)
    if os.environ.get("RANK", "0") == "0":  # the process group is not joined yet
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")


def join_run(cfg: RunConfig) -> tuple[int, int]:
    """Join the run's process group (under torchrun/deepspeed) before a stage builds anything; the
    run's image limits take effect."""
    from ..data.images import configure
    configure(cfg.data.max_image_pixels, cfg.data.max_image_aspect)
    return join(Runtime.of(cfg))


def train_stage(task: StageTask, cfg: RunConfig, resume: bool, progress: bool, hooks=()) -> dict:
    """The training loop on `task` in `cfg.output_dir`, the run config recorded with each checkpoint."""
    return train(task, Runtime.of(cfg), cfg.output_dir, resume=resume, progress=progress, hooks=hooks,
                 config=config_to_dict(cfg))


def append_summary(cfg: RunConfig, summary: dict) -> None:
    """One JSON line per finished stage in `<output_dir>/summary.jsonl` (rank 0)."""
    if not is_main():
        return
    from ..storage import append_text
    path = Path(cfg.output_dir) / "summary.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    append_text(path, json.dumps({"time": time.time(), **summary}, default=float) + "\n")


def stage_metadata(cfg: RunConfig, model, stage: str, shards: Optional[list] = None) -> dict[str, str]:
    """Model-file metadata of a finished stage: its name, and what each stage that made the model
    trained on (the stages of the `init_from` file first); a model card reads it."""
    facts = {"stage": stage, "train_shards": [Path(str(p)).name for p in (shards or cfg.data.train_shards)],
             "train_languages": list(cfg.data.train_languages)}
    train = getattr(getattr(cfg, stage, None), "train", None)
    if train is not None:
        facts.update(steps=train.steps, batch_size=train.batch_size, lr=train.optim.lr)
    if stage == "coop":
        facts.update(shots=cfg.coop.shots, epochs=cfg.coop.epochs, languages=list(cfg.coop.train_languages))
    if cfg.clip.pretrained:
        facts["clip_pretrained"] = f"{cfg.clip.model} {cfg.clip.pretrained}"
    if cfg.clip.checkpoint:
        facts["clip_checkpoint"] = Path(cfg.clip.checkpoint).name
    history = json.loads(getattr(model, "file_metadata", {}).get("training", "[]"))
    history = [h for h in history if h.get("stage") != stage] + [facts]
    return {"stage": stage, "training": json.dumps(history)}


def write_replica_checksum(cfg: RunConfig, task: torch.nn.Module, rank: int) -> None:
    """Each rank records a hash of its trained weights: replicas must agree after data-parallel training."""
    from ..storage import atomic_write_text, check_folder
    folder = check_folder(Path(cfg.output_dir) / "replicas")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{task.name}-rank{rank}.txt", state_fingerprint(task.training_state()) + "\n")


def warn_if_batch_exceeds_data(stage: str, unit: str, available: int, batch_size: int, accum_steps: int,
                               world: int) -> None:
    """A global batch larger than the data repeats each item within one batch (InfoNCE then sees
    duplicates as negatives): said once, with the counts."""
    import logging
    per_step = batch_size * accum_steps * world
    if available and per_step > available:
        logging.getLogger(__name__).warning(
            "%s: a step takes %d %s (batch_size %d x accum_steps %d x %d rank(s)) from only %d: each appears about "
            "%.1f times per step; lower %s.train.batch_size or add data", stage, per_step, unit, batch_size,
            accum_steps, world, available, per_step / available, stage)

