"""Teacher pre-training: contrastive training of a whole (small, English) open_clip model on the
training shards; the demo's stand-in for an English-centric CLIP. Writes `teacher.safetensors`."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .. import engine
from ..config import DataConfig, RunConfig, TeacherConfig
from ..engine import StageTask
from ..losses import Objective
from ..models.logit_scale import LogitScale
from ..models.proclip import ProCLIP
from .common import StreamBatches, append_summary, is_main


class TeacherTask(StreamBatches, StageTask):
    """Symmetric InfoNCE between the CLIP image and text towers, both trained."""

    name = "teacher"

    def __init__(self, model: ProCLIP, teacher: TeacherConfig, data: DataConfig, seed: int):
        super().__init__()
        self.train_cfg = teacher.train
        self.clip = model.clip
        self.tokenizer = model.clip_tokenizer
        # open_clip's 0-dim logit_scale would break DeepSpeed's parameter broadcast: it is taken
        # out while training and a (1,) copy trains instead (`export_logit_scale` puts it back).
        self.logit_scale = LogitScale(self.clip.logit_scale.exp().item(), teacher.max_logit_scale)
        del self.clip.logit_scale
        self.objective = Objective({"contrastive": 1.0}, where="teacher.loss")
        self._init_stream(data, model.preprocess_train, self.train_cfg.batch_size, seed)

    def next_batch(self) -> dict:
        batch = self._next_stream_batch()
        batch["tokens"] = self.tokenizer(batch["text"])
        return batch

    def features(self, batch: dict) -> dict:
        device = self.logit_scale.log_scale.device
        return {"image": self.clip.encode_image(batch["image"].to(device)),
                "text": self.clip.encode_text(batch["tokens"].to(device)), "logit_scale": self.logit_scale()}

    def loss(self, features: dict):
        loss, logged = self.objective(features)
        return loss, {**logged, "logit_scale": features["logit_scale"].detach()}

    def after_step(self) -> None:
        self.logit_scale.clamp_()

    def export_logit_scale(self, clip: nn.Module) -> None:
        self.logit_scale.export_to(clip)


def run_teacher(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train the teacher CLIP; returns the summary (with the model file's `path`)."""
    engine.seed_everything(cfg.seed)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    task = TeacherTask(model, cfg.teacher, cfg.data, cfg.seed)
    last = engine.train(task, cfg, cfg.output_dir, resume=resume, progress=progress)
    task.export_logit_scale(model.clip)
    path = Path(cfg.output_dir) / "teacher.safetensors"
    if is_main():
        model.save(path, {"stage": "teacher"})
    append_summary(cfg, {"stage": "teacher", **last})
    return {"stage": "teacher", "path": str(path), **last}
