"""Teacher pre-training: contrastive training of a small English open_clip model on the training
shards, the demo's stand-in for an English-centric CLIP. Writes `teacher.safetensors`.

Two ways (`teacher.lock_text_tower`):
- LiT: the text tower is a pretrained sentence encoder, locked. Its caption features are cached
  once, in the same sidecars (and under the same text-tower fingerprint) that stage 1 reads, so a
  step costs the image tower alone, and only the image tower and the logit scale train.
- scratch: both towers train from their initialisation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.nn as nn

from ..config import DataConfig, RunConfig, TeacherConfig
from ..distributed import is_main
from ..models.logit_scale import LogitScale
from ..models.proclip import ProCLIP
from ..models.towers import lock_text_tower
from .cache import build_caches, shard_text_features
from ..train import StageTask, seed_everything
from .common import StreamBatches, append_summary, join_run, stage_metadata, train_stage


class TeacherTask(StreamBatches, StageTask):
    """Symmetric InfoNCE between the CLIP image tower and its text tower. With `text_features`
    (LiT: `shard_features(url)` of the locked text tower's cache) the text side is read from the
    cache, and the task holds the image tower alone: the locked tower is in no checkpoint."""

    name = "teacher"
    provides = ("image", "text", "logit_scale")

    def __init__(self, model: ProCLIP, teacher: TeacherConfig, data: DataConfig, seed: int, text_features=None):
        super().__init__()
        self.train_cfg = teacher.train
        self.locked = text_features is not None
        if self.locked:
            self.visual = model.clip.visual
        else:
            self.clip = model.clip
        self.tokenizer = model.clip_tokenizer
        # open_clip's 0-dim logit_scale would break DeepSpeed's parameter broadcast: it is taken
        # out while training and a (1,) copy trains instead (`export_logit_scale` puts it back).
        self.logit_scale = LogitScale(model.clip.logit_scale.exp().item(), teacher.max_logit_scale)
        del model.clip.logit_scale
        self.objective = self.build_objective(teacher.losses, where="teacher.losses")
        self._init_stream(data, model.preprocess_train, self.train_cfg.batch_size, seed, text_features)

    def next_batch(self) -> dict:
        batch = self._next_stream_batch()
        if self.locked:
            batch["text_features"] = batch.pop("features")
        else:
            batch["tokens"] = self.tokenizer(batch["text"])
        return batch

    def features(self, batch: dict) -> dict:
        device = self.logit_scale.log_scale.device
        images = batch["image"].to(device)
        if self.locked:
            image, text = self.visual(images), batch["text_features"].to(device)
        else:
            image, text = self.clip.encode_image(images), self.clip.encode_text(batch["tokens"].to(device))
        return {"image": image, "text": text, "logit_scale": self.logit_scale()}

    def loss(self, features: dict):
        loss, logged = self.objective(features)
        return loss, {**logged, "logit_scale": features["logit_scale"].detach()}

    def after_step(self) -> None:
        self.logit_scale.clamp_()

    def export_logit_scale(self, clip: nn.Module) -> None:
        self.logit_scale.export_to(clip)


def teacher_data(cfg: RunConfig) -> DataConfig:
    """The data section the teacher trains on: `teacher.train_shards` when given."""
    if not cfg.teacher.train_shards:
        return cfg.data
    return dataclasses.replace(cfg.data, train_shards=list(cfg.teacher.train_shards))


def locked_text_features(cfg: RunConfig, model: ProCLIP, progress: bool = True):
    """LiT: lock the text tower, cache its features of the training captions (every rank its
    share; reused when current), and return the stream's per-shard reader of them."""
    lock_text_tower(model.clip)
    data = teacher_data(cfg)
    shards, languages = list(data.train_shards), list(data.train_languages)
    build_caches(cfg, model, llm=False, parts=[(shards, languages)], progress=progress)
    return shard_text_features(cfg, model, shards, languages, kind="clip")


def run_teacher(cfg: RunConfig, resume: bool = False, progress: bool = True, hooks=()) -> dict:
    """Train the teacher CLIP; returns the summary (with the model file's `path`)."""
    join_run(cfg)
    seed_everything(cfg.seed)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    text_features = locked_text_features(cfg, model, progress) if cfg.teacher.lock_text_tower else None
    task = TeacherTask(model, cfg.teacher, teacher_data(cfg), cfg.seed, text_features)
    last = train_stage(task, cfg, resume, progress, hooks)
    task.export_logit_scale(model.clip)
    path = Path(cfg.output_dir) / "teacher.safetensors"
    if is_main():
        model.save(path, stage_metadata(cfg, model, "teacher", cfg.teacher.train_shards or None))
    append_summary(cfg, {"stage": "teacher", "text_tower": "locked" if task.locked else "trained", **last})
    return {"stage": "teacher", "path": str(path), **last}
