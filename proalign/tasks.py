"""Stage tasks run by the engine: teacher pre-training, stage 1 (distill), stage 2 (align)."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RunConfig
from .data.shards import Batcher, ImageTextStream
from .ema import EMATeacher
from .engine import StageTask
from .losses import LogitScale, distillation_loss, infonce_loss, self_distillation_loss
from .models.proclip import ProCLIP

log = logging.getLogger(__name__)


class _StreamMixin:
    """Image-text stream with a resumable position (samples consumed on this rank)."""

    def _init_stream(self, cfg: RunConfig, preprocess, batch_size: int, languages):
        self._stream = ImageTextStream(cfg.data.train_shards, preprocess, languages, seed=cfg.seed)
        self._batch_size, self._workers = batch_size, cfg.data.num_workers
        self._start_sample = 0
        self._batcher: Optional[Batcher] = None

    def _next_stream_batch(self) -> dict:
        if self._batcher is None:
            self._batcher = Batcher(self._stream, self._batch_size, self._workers, self._start_sample)
        return self._batcher.next_batch()

    def data_state(self) -> dict:
        return {"samples_consumed": self._batcher.consumed if self._batcher else self._start_sample}

    def load_data_state(self, state: dict) -> None:
        self._start_sample = int(state.get("samples_consumed", 0))
        self._batcher = None

    def skip_counts(self) -> dict:
        return dict(self._batcher.skips) if self._batcher else {}


class EpochSampler:
    """Batches of row indices from a seeded permutation per epoch; the position (rows consumed)
    is the whole resume state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.position = 0

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def next(self) -> torch.Tensor:
        epoch, offset = divmod(self.position, self.n)
        idx = self._perm(epoch)[offset:offset + self.batch_size]
        if len(idx) < self.batch_size:  # wrap into the next epoch's order
            idx = torch.cat([idx, self._perm(epoch + 1)[:self.batch_size - len(idx)]])
        self.position += self.batch_size
        return idx


class TeacherTask(_StreamMixin, StageTask):
    """Contrastive pre-training of a whole open_clip model (the demo's English CLIP)."""

    name = "teacher"

    def __init__(self, model: ProCLIP, cfg: RunConfig):
        super().__init__()
        self.clip = model.clip
        self.tokenizer = model.clip_tokenizer
        # open_clip's 0-dim logit_scale would break DeepSpeed's parameter broadcast: it is taken
        # out while training and a (1,) copy trains instead (`export_logit_scale` puts it back).
        self.logit_scale = LogitScale(self.clip.logit_scale.exp().item(), cfg.stage2.max_logit_scale)
        del self.clip.logit_scale
        self._init_stream(cfg, model.preprocess_train, cfg.teacher.train.batch_size, cfg.data.train_languages)

    def next_batch(self) -> dict:
        batch = self._next_stream_batch()
        batch["tokens"] = self.tokenizer(batch["text"])
        return batch

    def forward(self, batch: dict):
        device = self.logit_scale.log_scale.device
        image = self.clip.encode_image(batch["image"].to(device))
        text = self.clip.encode_text(batch["tokens"].to(device))
        scale = self.logit_scale()
        loss = infonce_loss(image, text, scale)
        return loss, {"logit_scale": scale.detach()}

    def after_step(self) -> None:
        self.logit_scale.clamp_()

    def export_logit_scale(self, clip: nn.Module) -> None:
        self.logit_scale.export_to(clip)


class Stage1Task(StageTask):
    """Distil the CLIP text teacher into adapter(LLM(text)), from cached features."""

    name = "stage1"

    def __init__(self, adapter: nn.Module, llm_feats: torch.Tensor, teacher_feats: torch.Tensor, cfg: RunConfig):
        super().__init__()
        if len(llm_feats) != len(teacher_feats) or len(llm_feats) == 0:
            raise ValueError(f"stage1: need matching, non-empty features (got {len(llm_feats)} LLM rows, "
                             f"{len(teacher_feats)} teacher rows)")
        self.adapter = adapter
        self.register_buffer("llm_feats", llm_feats.float(), persistent=False)
        self.register_buffer("teacher_feats", teacher_feats.float(), persistent=False)
        self.s1 = cfg.stage1
        self.sampler = EpochSampler(len(llm_feats), cfg.stage1.train.batch_size, cfg.seed)

    def next_batch(self) -> dict:
        return {"index": self.sampler.next()}

    def forward(self, batch: dict):
        idx = batch["index"].to(self.llm_feats.device)
        student = self.adapter(self.llm_feats[idx])
        loss, parts = distillation_loss(student, self.teacher_feats[idx], self.s1.w_instance,
                                        self.s1.w_structure, self.s1.reduction)
        return loss, parts

    def data_state(self) -> dict:
        return {"position": self.sampler.position}

    def load_data_state(self, state: dict) -> None:
        self.sampler.position = int(state.get("position", 0))


class Stage2Task(_StreamMixin, StageTask):
    """Image tower + adapter with symmetric InfoNCE and EMA self-distillation."""

    name = "stage2"

    def __init__(self, model: ProCLIP, cfg: RunConfig, text_cache: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        s2 = cfg.stage2
        self.visual = model.clip.visual
        self.adapter = model.adapter
        self.ema = EMATeacher(self.visual, s2.ema_momentum)
        self.logit_scale = LogitScale(s2.init_logit_scale, s2.max_logit_scale)
        self.lambda_sd, self.reduction = s2.lambda_sd, s2.reduction
        self.embedder = model.embedder
        self.text_cache = text_cache or {}
        self.cache_misses = 0
        self.evaluator = None  # set by the pipeline: () -> held-out retrieval metrics
        self._init_stream(cfg, model.preprocess_train, s2.train.batch_size, cfg.data.train_languages)

    def _llm_features(self, ids, texts) -> torch.Tensor:
        rows = [self.text_cache.get(i) for i in ids]
        missing = [k for k, r in enumerate(rows) if r is None]
        if missing:
            if self.embedder is None:
                raise KeyError(f"stage2: caption {ids[missing[0]]} is not in the embedding cache")
            self.cache_misses += len(missing)
            fresh = self.embedder.encode([texts[k] for k in missing])
            for k, row in zip(missing, fresh):
                rows[k] = row
        return torch.stack(rows)

    def next_batch(self) -> dict:
        batch = self._next_stream_batch()
        batch["llm"] = self._llm_features(batch["caption_id"], batch["text"])
        return batch

    def forward(self, batch: dict):
        device = self.logit_scale.log_scale.device
        images = batch["image"].to(device)
        image = self.visual(images)
        text = self.adapter(batch["llm"].to(device))
        scale = self.logit_scale()
        contrastive = infonce_loss(image, text, scale)
        if self.lambda_sd == 0:  # no self-distillation: skip the teacher's forward pass
            return contrastive, {"loss_clip": contrastive.detach(), "logit_scale": scale.detach()}
        with torch.no_grad(), torch.profiler.record_function("stage2/teacher_forward"):
            ema_image = self.ema(images)
        sd, parts = self_distillation_loss(image, ema_image, self.reduction)
        loss = contrastive + self.lambda_sd * sd
        return loss, {"loss_clip": contrastive.detach(), **parts, "logit_scale": scale.detach()}

    def after_step(self) -> None:
        with torch.profiler.record_function("stage2/ema_update"):
            self.ema.update(self.visual)
        self.logit_scale.clamp_()

    def export_logit_scale(self, clip: nn.Module) -> None:
        self.logit_scale.export_to(clip)

    def evaluate(self) -> dict:
        return self.evaluator() if self.evaluator else {}


@torch.no_grad()
def heldout_cosine(adapter: nn.Module, llm_feats: torch.Tensor, teacher_feats: torch.Tensor) -> float:
    """Mean cosine between distilled text embeddings and the teacher's."""
    if len(llm_feats) == 0:
        return float("nan")
    was = adapter.training
    adapter.eval()
    student = adapter(llm_feats.to(next(adapter.parameters()).device)).cpu()
    adapter.train(was)
    return F.cosine_similarity(student, teacher_feats, dim=-1).mean().item()


class CoopTask(StageTask):
    """CoOp few-shot classification: cross-entropy of image features against the class prompts'
    embeddings (learned context -> frozen embedder -> adapter). Only the context trains, plus the
    adapter when `coop.train_adapter`."""

    name = "coop"

    def __init__(self, prompt: nn.Module, adapter: nn.Module, image_feats: torch.Tensor, labels: torch.Tensor,
                 class_names: list[list[str]], logit_scale: float, cfg: RunConfig):
        super().__init__()
        if len(image_feats) != len(labels) or len(labels) == 0:
            raise ValueError(f"coop: need one label per image feature (got {len(image_feats)} and {len(labels)})")
        if any(not names for names in class_names):
            raise ValueError("coop: every class needs at least one name in coop.train_languages")
        self.prompt = prompt
        self.adapter = adapter.requires_grad_(cfg.coop.train_adapter)
        self.register_buffer("image_feats", F.normalize(image_feats.float(), dim=-1), persistent=False)
        self.register_buffer("labels", labels.long(), persistent=False)
        self.class_names = class_names
        self.logit_scale = float(logit_scale)
        self.classes_per_step = cfg.coop.classes_per_step
        self.seed = cfg.seed
        self.sampler = EpochSampler(len(labels), cfg.coop.batch_size, cfg.seed)

    def next_batch(self) -> dict:
        step = self.sampler.position
        idx = self.sampler.next()
        rng = torch.Generator().manual_seed(self.seed * 104729 + step)
        n_classes = len(self.class_names)
        classes = torch.unique(self.labels[idx])
        wanted = self.classes_per_step or n_classes
        if len(classes) < wanted:  # random negatives, drawn per step
            others = torch.ones(n_classes, dtype=torch.bool)
            others[classes] = False
            pool = others.nonzero().squeeze(1)
            extra = pool[torch.randperm(len(pool), generator=rng)[:wanted - len(classes)]]
            classes = torch.cat([classes, extra])
        names = [self.class_names[c][int(torch.randint(len(self.class_names[c]), (1,), generator=rng))]
                 for c in classes.tolist()]
        return {"index": idx, "classes": classes, "names": names}

    def forward(self, batch: dict):
        device = self.image_feats.device
        classes = batch["classes"].to(device)
        text = F.normalize(self.adapter(self.prompt(batch["names"], classes)), dim=-1)
        idx = batch["index"].to(device)
        logits = self.logit_scale * self.image_feats[idx] @ text.T
        # target: where each image's class sits in this step's class list
        lookup = torch.full((len(self.class_names),), -1, dtype=torch.long, device=device)
        lookup[classes] = torch.arange(len(classes), device=device)
        target = lookup[self.labels[idx]]
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(1) == target).float().mean()
        return loss, {"train_acc": accuracy.detach()}

    def data_state(self) -> dict:
        return {"position": self.sampler.position}

    def load_data_state(self, state: dict) -> None:
        self.sampler.position = int(state.get("position", 0))
