"""CoOp head: learnable context vectors fed to the frozen LLM embedder through `inputs_embeds`,
trained few-shot for zero-shot classification (CoOp's schedule). Writes `coop.safetensors`,
coop_results.md and coop_accuracy.png (per language: hand-written prompt vs learned context)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CoopConfig, OptimConfig, RunConfig, TrainConfig
from ..data.samplers import EpochSampler
from ..distributed import is_main
from ..models.proclip import ProCLIP
from ..models.towers import module_fingerprint
from ..storage import save_tensors
from ..train import StageTask, seed_everything
from .common import append_summary, stage_metadata, train_stage

log = logging.getLogger(__name__)


def coop_epochs(coop: CoopConfig) -> int:
    """Epochs for this head's shot count (`epochs_by_shots`, else `epochs`)."""
    return int(coop.epochs_by_shots.get(coop.shots, coop.epochs))


def coop_train_config(coop: CoopConfig, n_train: int) -> TrainConfig:
    """CoOp's epoch-based schedule as training steps: SGD, cosine, `warmup_epochs` of warm-up."""
    per_epoch = max(1, -(-n_train // coop.batch_size))
    return TrainConfig(steps=coop_epochs(coop) * per_epoch, batch_size=coop.batch_size, log_every=coop.log_every,
                       checkpoint_every=per_epoch,
                       optim=OptimConfig(optimizer="sgd", lr=coop.lr, momentum=coop.momentum,
                                         weight_decay=coop.weight_decay,
                                         warmup_steps=coop.warmup_epochs * per_epoch, schedule="cosine"))


class CoopTask(StageTask):
    """CoOp few-shot classification: cross-entropy of image features against the class prompts'
    embeddings (learned context -> frozen embedder -> adapter). Only the context trains, plus the
    adapter when `coop.train_adapter`."""

    name = "coop"
    provides = ("image", "class_text", "logit_scale", "target")

    def __init__(self, prompt: nn.Module, adapter: nn.Module, image_feats: torch.Tensor, labels: torch.Tensor,
                 class_names: list[list[str]], logit_scale: float, coop: CoopConfig, seed: int):
        super().__init__()
        if len(image_feats) != len(labels) or len(labels) == 0:
            raise ValueError(f"coop: need one label per image feature (got {len(image_feats)} and {len(labels)})")
        if any(not names for names in class_names):
            raise ValueError("coop: every class needs at least one name in coop.train_languages")
        self.train_cfg = coop_train_config(coop, len(labels))
        self.prompt = prompt
        self.adapter = adapter.requires_grad_(coop.train_adapter)
        self.register_buffer("image_feats", F.normalize(image_feats.float(), dim=-1), persistent=False)
        self.register_buffer("labels", labels.long(), persistent=False)
        self.class_names = class_names
        self.logit_scale = float(logit_scale)
        self.classes_per_step = coop.classes_per_step
        self.seed = seed
        self.sampler = EpochSampler(len(labels), self.train_cfg.batch_size, seed)
        self.objective = self.build_objective(coop.losses, where="coop.losses")

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

    def features(self, batch: dict) -> dict:
        device = self.image_feats.device
        classes = batch["classes"].to(device)
        text = F.normalize(self.adapter(self.prompt(batch["names"], classes)), dim=-1)
        idx = batch["index"].to(device)
        # target: where each image's class sits in this step's class list
        lookup = torch.full((len(self.class_names),), -1, dtype=torch.long, device=device)
        lookup[classes] = torch.arange(len(classes), device=device)
        return {"image": self.image_feats[idx], "class_text": text, "logit_scale": self.logit_scale,
                "target": lookup[self.labels[idx]]}

    def loss(self, features: dict):
        return self.objective(features)

    def data_state(self) -> dict:
        return {"position": self.sampler.position}

    def load_data_state(self, state: dict) -> None:
        self.sampler.position = int(state.get("position", 0))


@torch.no_grad()
def encode_images(model: ProCLIP, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    device = next(model.clip.parameters()).device
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def coop_data(cfg: RunConfig, preprocess, shots: int, seed: int):
    """(training set with `shots` per class drawn with `seed`, evaluation set, in-domain set or
    None): from `coop.train_data`/`coop.eval_data` (a classification format: imagefolder,
    coop-split), else from labelled shards; the in-domain set (`coop.in_domain`) is the training
    shards' images of the training classes that the draw left out."""
    from ..data.classification import read_labelled
    from ..data.datasets import load_classification
    c = cfg.coop

    def load(dataset, shards, shots_, max_samples, **classes):
        if dataset is not None:
            return load_classification(dataset.format, dataset.path, preprocess, dataset.options,
                                       max_samples=max_samples or dataset.max_samples, shots=shots_, seed=seed,
                                       **classes)
        return read_labelled(shards, preprocess, shots_, seed, max_samples=max_samples, **classes)
    train_shards = c.train_shards or cfg.data.train_shards
    train = load(c.train_data, train_shards, shots, None, max_classes=c.max_classes)
    wanted = {"only_classes": set(train.classes)} if c.max_classes or c.in_domain else {}
    evaluation = load(c.eval_data, c.eval_shards or cfg.data.eval_shards, None, cfg.data.max_eval_samples, **wanted)
    in_domain = read_labelled(train_shards, preprocess, shots, seed, only_classes=set(train.classes),
                              rest=True) if c.in_domain else None
    return train, evaluation, in_domain


@dataclass
class HeadData:
    """The CoOp head's images as features: the training set (classes without a name in
    coop.train_languages left out) and each evaluation part (all, or base and new)."""
    train_set: object          # LabelledImages
    names: list[list[str]]     # per training class, its names in the training languages
    train_feats: torch.Tensor
    train_labels: torch.Tensor
    eval_parts: dict           # part -> LabelledImages
    eval_feats: dict           # part -> image features
    eval_classes: list         # the evaluation set's classes (all parts)


class FeatureMemo:
    """Image features by where each image came from (shard#key): the frozen image tower encodes an
    image once for every head and seed of a protocol run."""

    def __init__(self):
        self.rows: dict[str, torch.Tensor] = {}
        self.encoded = 0

    def features(self, model: ProCLIP, data) -> torch.Tensor:
        if not data.keys:  # a set without keys (a classification format): encoded as it is
            return encode_images(model, data.images)
        missing = [i for i, key in enumerate(data.keys) if key not in self.rows]
        if missing:
            fresh = encode_images(model, data.images[torch.tensor(missing)])
            self.rows.update({data.keys[i]: row for i, row in zip(missing, fresh)})
            self.encoded += len(missing)
        return torch.stack([self.rows[key] for key in data.keys])


def head_data(cfg: RunConfig, model: ProCLIP, classes: str = "all", memo: Optional[FeatureMemo] = None) -> HeadData:
    """Load the few-shot training set and the evaluation set(s), split base/new if asked, and encode
    their images with the model's image tower (once per image across heads sharing `memo`)."""
    from ..data.classification import class_halves
    c = cfg.coop
    memo = memo or FeatureMemo()
    train_set, eval_set, in_domain = coop_data(cfg, model.preprocess_eval, c.shots, cfg.seed)
    eval_parts = {"all": eval_set}
    if classes == "base-to-new":
        base, new = class_halves(len(train_set.classes))
        base_ids, new_ids = [train_set.classes[i] for i in base], [train_set.classes[i] for i in new]
        train_set = train_set.only(base_ids)
        eval_parts = {"base": eval_set.only(base_ids), "new": eval_set.only(new_ids)}
        for part, data in eval_parts.items():
            if not len(data.labels):
                raise ValueError(f"coop base-to-new: the evaluation set has no images of the {part} classes")
    names = [[n for lang in c.train_languages for n in train_set.names[k].get(lang, [])]
             for k in range(len(train_set.classes))]
    usable = torch.tensor([bool(n) for n in names])
    if not usable.any():
        raise ValueError(f"coop.train_languages={c.train_languages}: no training class has a name in them")
    if not usable.all():
        log.warning("coop: %d of %d training classes have no name in %s and are left out",
                    int((~usable).sum()), len(names), c.train_languages)
    if in_domain is not None:
        eval_parts["in-domain"] = in_domain.only(train_set.classes)  # base-to-new: the base classes
    keep_rows = usable[train_set.labels]
    train_feats = memo.features(model, train_set)[keep_rows]
    eval_feats = {part: memo.features(model, data) for part, data in eval_parts.items()}
    print(f"coop: {len(train_set.classes)} classes, {int(keep_rows.sum())} training images "
          f"(<= {c.shots} shots each); eval " + ", ".join(
              f"{part} {len(d.classes)} classes / {len(d.labels)} images" for part, d in eval_parts.items()))
    return HeadData(train_set, names, train_feats, train_set.labels[keep_rows], eval_parts, eval_feats,
                    list(eval_set.classes))


def train_head(cfg: RunConfig, model: ProCLIP, data: HeadData, resume: bool = False, progress: bool = True,
               hooks=()) -> tuple[dict, Optional[dict]]:
    """Attach a PromptLearner to `model` and train it (CoOp's schedule); returns (last metrics,
    the learned-context index of each class id, for class-specific context)."""
    from ..models.prompt import PromptLearner
    c, p = cfg.coop, cfg.coop.prompt
    model.prompt = PromptLearner(model.embedder, p.n_ctx, p.position, p.class_specific, data.train_set.classes,
                                 p.init_phrase)
    train_index = None
    if p.class_specific:
        train_index = {cls: i for i, cls in enumerate(data.train_set.classes)}
        missing = [cls for cls in data.eval_classes if cls not in train_index]
        if missing:
            raise ValueError(f"coop.prompt.class_specific: eval class {missing[0]!r} has no learned context "
                             "(class-specific context only covers the training classes)")
    embedder_sum = module_fingerprint(model.embedder)
    logit_scale = model.clip.logit_scale.exp().item()
    task = CoopTask(model.prompt, model.adapter, data.train_feats, data.train_labels, data.names, logit_scale,
                    c, cfg.seed)
    last = train_stage(task, cfg, resume, progress, hooks)
    if module_fingerprint(model.embedder) != embedder_sum:
        raise RuntimeError("coop: the frozen embedder's weights changed during training")
    return {**last, "embedder_checksum": embedder_sum}, train_index


def evaluate_head(cfg: RunConfig, model: ProCLIP, data: HeadData, train_index: Optional[dict] = None
                  ) -> dict[str, list[dict]]:
    """Per evaluation part, per language: top-1 with the hand-written prompt vs the learned context."""
    from ..eval.zeroshot import accuracy_handwritten_vs_learned
    model.eval()

    def index_of(part_data) -> Optional[Callable]:  # a part's class index -> its learned context
        if train_index is None:
            return None
        lookup = torch.tensor([train_index[cls] for cls in part_data.classes])
        return lambda index: lookup[index]
    return {part: accuracy_handwritten_vs_learned(data.eval_feats[part], part_data, model, cfg.coop.templates,
                                                  cfg.coop.eval_languages or None, class_index_of=index_of(part_data))
            for part, part_data in data.eval_parts.items()}


def run_coop(cfg: RunConfig, resume: bool = False, model: Optional[ProCLIP] = None, progress: bool = True,
             classes: str = "all", save_model: bool = True, hooks=(), memo: Optional[FeatureMemo] = None) -> dict:
    """Few-shot CoOp head on the (stage-2) model; per-language accuracy hand-written vs learned.
    `classes="base-to-new"`: train on the base half of the training classes (CoOp's split) and
    report the evaluation set's base and new classes apart (`rows` and `rows_new`)."""
    from ..eval.report import coop_report, coop_table
    c = cfg.coop
    if classes not in ("all", "base-to-new"):
        raise ValueError(f"coop classes must be 'all' or 'base-to-new', got {classes!r}")
    if classes == "base-to-new" and c.prompt.class_specific:
        raise ValueError("coop.prompt.class_specific: base-to-new needs a context shared by all classes "
                         "(new classes have no class-specific context)")
    seed_everything(cfg.seed)
    model = model or ProCLIP.from_config(cfg)
    data = head_data(cfg, model, classes, memo)
    last, train_index = train_head(cfg, model, data, resume, progress, hooks)
    results = evaluate_head(cfg, model, data, train_index)
    after = results.get("all", results.get("base"))
    out = Path(cfg.output_dir)
    if is_main():
        if save_model:
            shards = [c.train_data.path] if c.train_data else c.train_shards or None
            model.save(out / "coop.safetensors", stage_metadata(cfg, model, "coop", shards))
        else:  # the protocol keeps the learned context alone (the rest is the init_from model)
            save_tensors({f"prompt.{k}": v for k, v in model.prompt.learnable_state_dict().items()},
                         out / "context.safetensors", model.prompt.describe())
        coop_report(after, out / "coop_results.md", out / "coop_accuracy.png")
    summary = {"stage": "coop", **last, "rows": after, "truncated_prompts": model.prompt.truncated_count,
               "classes": classes, "shots": c.shots, "seed": cfg.seed}
    if "new" in results:
        summary["rows_new"] = results["new"]
    if "in-domain" in results:
        summary["rows_in_domain"] = results["in-domain"]
    print(coop_table(after))
    append_summary(cfg, summary)
    return summary
