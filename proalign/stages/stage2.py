"""Stage 2 (align): the CLIP image tower and the adapter train with symmetric InfoNCE against the
(frozen) LLM text tower, plus self-distillation toward an EMA copy of the image tower.
Writes `stage2.safetensors`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.data import IterableDataset

from ..config import DataConfig, RunConfig, Stage2Config
from ..ema import EMATeacher
from ..distributed import is_main
from ..eval.evaluator import Evaluator, image_encoder, llm_text_tower, load_shard_set, mean_recalls
from ..models.logit_scale import LogitScale
from ..models.proclip import ProCLIP
from .cache import build_caches, cached_llm_features, embedder_built, llm_cache, shard_text_features, training_model
from ..train import StageTask, seed_everything
from .common import (StreamBatches, append_summary, join_run, stage_metadata, train_stage, warn_if_batch_exceeds_data,
                     write_replica_checksum)


class Stage2Task(StreamBatches, StageTask):
    """Image tower + adapter with `stage2.losses` (symmetric InfoNCE and EMA self-distillation by
    default, any registered term besides). LLM features are read with the images, one shard's cache at a time
    (`shard_features(url)` -> {sample key: {caption id: row}}); the frozen embedder is not part of
    the task."""

    name = "stage2"
    provides = ("image", "text", "logit_scale", "ema_image")

    def __init__(self, model: ProCLIP, stage2: Stage2Config, data: DataConfig, seed: int,
                 shard_features: Callable[[str], Mapping[str, Mapping[str, torch.Tensor]]],
                 stream: Optional[IterableDataset] = None):
        super().__init__()
        self.train_cfg = stage2.train
        self.visual = model.clip.visual
        self.adapter = model.adapter.requires_grad_(stage2.train_adapter)
        self.ema = EMATeacher(self.visual, stage2.ema_momentum)
        self.logit_scale = LogitScale(stage2.init_logit_scale, stage2.max_logit_scale)
        self.objective = self.build_objective(stage2.losses, stage2.reduction, "stage2.losses", stage2.scope)
        self.evaluator: Optional[Callable[[], dict]] = None  # () -> held-out metrics, set by the driver
        if stream is None:
            self._init_stream(data, model.preprocess_train, self.train_cfg.batch_size, seed, shard_features)
        else:  # items {"image", "features", ...} from elsewhere (proalign check's synthetic batches)
            self._use_stream(stream, self.train_cfg.batch_size)

    def next_batch(self) -> dict:
        batch = self._next_stream_batch()
        batch["llm"] = batch.pop("features")
        return batch

    def features(self, batch: dict) -> dict:
        device = self.logit_scale.log_scale.device
        images = batch["image"].to(device)
        features = {"image": self.visual(images), "text": self.adapter(batch["llm"].to(device)),
                    "logit_scale": self.logit_scale()}
        if "ema_image" in self.objective.needs:  # no self-distillation: no teacher forward pass
            with torch.no_grad(), torch.profiler.record_function("stage2/teacher_forward"):
                features["ema_image"] = self.ema(images)
        return features

    def loss(self, features: dict):
        loss, logged = self.objective(features)
        return loss, {**logged, "logit_scale": features["logit_scale"].detach()}

    def after_step(self) -> None:
        with torch.profiler.record_function("stage2/ema_update"):
            self.ema.update(self.visual)
        self.logit_scale.clamp_()

    def export_logit_scale(self, clip: nn.Module) -> None:
        self.logit_scale.export_to(clip)

    def evaluate(self) -> dict:
        return self.evaluator() if self.evaluator else {}


def heldout_evaluation(cfg: RunConfig, model: ProCLIP) -> Callable[[], dict]:
    """() -> mean held-out R@k over the training languages: eval images decoded once, eval
    captions read from the embedding cache."""
    languages = list(cfg.data.train_languages)
    evaluator = Evaluator([load_shard_set("heldout", cfg.data.eval_shards, model.preprocess_eval, languages,
                                          cfg.data.max_eval_samples, cfg.data.captions)])
    # the eval shards' caches hold at least the training languages (`cache_languages`)
    cache = cached_llm_features(cfg, model, cfg.data.eval_shards, languages)
    tower = llm_text_tower(model, "proclip", cache)

    def run() -> dict:
        model.eval()
        rows = evaluator.evaluate(image_encoder(model), [tower])
        model.train()
        return mean_recalls(rows)
    return run


def run_stage2(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True,
               hooks=()) -> dict:
    """Build the LLM caches (every rank its share), align, report held-out retrieval before/after, export."""
    rank, world = join_run(cfg)
    torch.manual_seed(cfg.seed)
    model = model or training_model(cfg)
    build_caches(cfg, model, teacher=False, progress=progress)
    # every rank evaluates the same bounded set (rank 0 reports): no rank waits in a collective
    # while another evaluates
    heldout = heldout_evaluation(cfg, model) if cfg.data.eval_shards else None
    before = heldout() if heldout else {}
    seed_everything(cfg.seed)
    train_text = shard_text_features(cfg, model, cfg.data.train_shards, cfg.data.train_languages)
    samples = llm_cache(cfg, model).summary(cfg.data.train_shards, cfg.data.train_languages)["shard_samples"]
    warn_if_batch_exceeds_data("stage2", "samples", sum(samples.values()), cfg.stage2.train.batch_size,
                               cfg.stage2.train.accum_steps, world)
    task = Stage2Task(model, cfg.stage2, cfg.data, cfg.seed, train_text)
    task.evaluator = heldout
    last = train_stage(task, cfg, resume, progress, hooks)
    task.export_logit_scale(model.clip)
    write_replica_checksum(cfg, task, rank)
    after = heldout() if heldout else {}
    if is_main():
        model.save(Path(cfg.output_dir) / "stage2.safetensors", stage_metadata(cfg, model, "stage2"))
    summary = {"stage": "stage2", **last, "embedder_built": embedder_built(model), **{f"before_{k}": v for k, v in before.items()},
               **{f"after_{k}": v for k, v in after.items()}}
    append_summary(cfg, summary)
    if before and is_main():
        print("stage2: held-out retrieval, before -> after")
        for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
            cells = ", ".join(f"R@{k} {before[f'{direction}_R@{k}']:.3f} -> {after[f'{direction}_R@{k}']:.3f}"
                              for k in (1, 5, 10))
            print(f"  {label}: {cells}")
    return summary
