"""ProCLIP losses. Inputs are raw features; every loss L2-normalises before comparing."""
from __future__ import annotations

import inspect
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .distributed import rank_and_world
from .config import loss_entry
from .errors import ConfigError
from .registry import Registry


REDUCTIONS = ("sum", "mean")
SCOPES = ("global", "local")


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_element.sum()
    if reduction == "mean":
        return per_element.mean()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def instance_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """sum_i ||s_i - t_i||^2 on normalised rows (the reference's `mse_loss(reduction='sum')`).
    `sum` scales with the batch size N; `mean` is the mean over the N rows."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return _reduce((s - t).pow(2).sum(-1), reduction)


def _distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(n, m) L2 distances between float64 rows and columns; safe gradient at zero distance.

    |a-b|^2 = |a|^2 + |b|^2 - 2ab from one Gram matrix: no (n*m, D) difference tensor, which made
    the loss 4x slower than the adapter step itself. The callers pass float64: in float32 the
    cancellation for near-duplicate rows costs up to 1e-3 in distance and more than the whole
    gradient at separations <= 1e-3."""
    dist2 = rows.pow(2).sum(-1)[:, None] + cols.pow(2).sum(-1)[None, :] - 2.0 * rows @ cols.T
    # sqrt(0) has an infinite gradient; the floor keeps identical rows finite (and the diagonal out).
    return dist2.clamp_min(1e-24).sqrt()


def structure_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """smooth_L1(pdist(S), pdist(T)), beta 1, over the N(N-1)/2 in-batch pairs; 0 for a batch of one.
    `sum` is the reference's `reduction='sum'` (grows with N^2); `mean` is the mean over pairs."""
    if student.shape[0] < 2:
        return student.sum() * 0.0
    # float64 throughout (also under autocast): the distances of near-identical rows need it.
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.double(), dim=-1)
        t = F.normalize(teacher.double(), dim=-1)
        n = s.shape[0]
        i, j = torch.triu_indices(n, n, offset=1, device=s.device)  # F.pdist's pairs, in its order
        per_pair = F.smooth_l1_loss(_distances(s, s)[i, j], _distances(t, t)[i, j], reduction="none", beta=1.0)
        return _reduce(per_pair, reduction).to(student.dtype)


def _gathered_instance(student, teacher, reduction: str, world: int) -> torch.Tensor:
    """This rank's share of the instance loss on the global batch (equal batches per rank): the
    mean over ranks is the single-process loss, for both reductions."""
    local = instance_loss(student, teacher, "sum")
    return local * world if reduction == "sum" else local / student.shape[0]


def _gathered_structure(student, teacher, reduction: str, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the structure loss on the global batch, scaled so that the mean over
    ranks (what DDP/DeepSpeed gradient averaging optimises) is the single-process loss. Every
    global pair is covered once over all ranks: this rank's rows against all rows (each unordered
    pair is seen twice across ranks, hence the half), never a (global x global) matrix."""
    n = student.shape[0]
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.double(), dim=-1)
        t = F.normalize(teacher.double(), dim=-1)
        s_all, t_all = gather_features(s), gather_features(t.detach())
        total = s_all.shape[0]
        others = torch.ones(n, total, dtype=torch.bool, device=s.device)
        others[torch.arange(n), torch.arange(n) + rank * n] = False
        per_pair = F.smooth_l1_loss(_distances(s, s_all)[others], _distances(t, t_all)[others], reduction="none")
        struct = 0.5 * per_pair.sum() * world
        if reduction == "mean":
            struct = struct / max(1, total * (total - 1) // 2)
        return struct.to(student.dtype)


def _gathering(reduction: str, gather: bool) -> tuple[int, int]:
    """(rank, world) when the term is computed on the global batch, else (0, 1)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return rank_and_world() if gather else (0, 1)


def instance_term(student, teacher, reduction: str = "sum", gather: bool = False) -> torch.Tensor:
    """`instance_loss`, or under data parallelism with `gather` this rank's share of it on the global batch."""
    _, world = _gathering(reduction, gather)
    if world > 1:
        return _gathered_instance(student, teacher, reduction, world)
    return instance_loss(student, teacher, reduction)


def structure_term(student, teacher, reduction: str = "sum", gather: bool = False) -> torch.Tensor:
    """`structure_loss`, or under data parallelism with `gather` this rank's share of it on the global batch."""
    rank, world = _gathering(reduction, gather)
    if world > 1:
        return _gathered_structure(student, teacher, reduction, rank, world)
    return structure_loss(student, teacher, reduction)


def distillation_loss(student, teacher, w_instance=1.0, w_structure=1.0, reduction="sum", gather: bool = False):
    """w_ins * L_ins + w_struct * L_struct, both reduced by `reduction`; returns (total, parts).

    With `gather` under data parallelism, both terms are this rank's share of the loss on the
    global batch, so the result does not depend on the world size."""
    ins = instance_term(student, teacher, reduction, gather)
    struct = structure_term(student, teacher, reduction, gather)
    return w_instance * ins + w_structure * struct, {"loss_instance": ins.detach(), "loss_structure": struct.detach()}


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's shard (all_reduce),
    so cross-rank negatives push gradient back to the rank that owns them. Works on gloo and nccl."""

    @staticmethod
    def forward(ctx, local):
        shards = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, local.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), local.shape[0]
        return torch.cat(shards)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(local: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated in rank order (equal batch per rank), differentiable."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE: local rows against the global (gathered) batch, open_clip's
    `local_loss` + `gather_with_grad` semantics. The mean over ranks equals the single-process
    loss on the global batch, and so do the rank-averaged gradients (DDP/DeepSpeed averaging).
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    rank = dist.get_rank() if gather and dist.is_available() and dist.is_initialized() else 0
    all_image = gather_features(image) if gather else image
    all_text = gather_features(text) if gather else text
    n = image.shape[0]
    labels = torch.arange(n, device=image.device) + rank * n
    logits_i2t = logit_scale * image @ all_text.T
    logits_t2i = logit_scale * text @ all_image.T
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def self_distillation_loss(image: torch.Tensor, ema_image: torch.Tensor, reduction: str = "sum",
                           gather: bool = True):
    """L_ins(I, Ī) + L_struct(I, Ī) against the EMA image tower's features, on the global batch."""
    total, parts = distillation_loss(image, ema_image.detach(), 1.0, 1.0, reduction, gather)
    return total, {"sd_instance": parts["loss_instance"], "sd_structure": parts["loss_structure"]}


# --------------------------------------------------------------------------- loss terms as modules
# A stage's objective is a weighted sum of registered terms, named with their weights in the
# stage's config (`stage2.losses: {contrastive: 1.0, self_distillation: 1.0, <yours>: 0.1}`).
# A new term is one class here (or in any module imported before the stage is built).

LOSS_TERMS: Registry[type["LossTerm"]] = Registry("loss term")


def register_loss(name: str):
    def add(cls):
        cls.term = name
        return LOSS_TERMS.register(name)(cls)
    return add


class LossTerm(nn.Module):
    """One named term. `needs` lists the features it reads from the task's feature dict (a task
    says what it `provides`); `forward(features)` returns {term: value, **diagnostics}: the total
    sums the value under the term's own name, the rest is only logged. `reduction` is the stage's
    (`sum` or `mean`)."""

    term = "term"
    needs: tuple[str, ...] = ()

    def __init__(self, reduction: str = "sum", scope: str = "global"):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.reduction = reduction
        # Under data parallelism: `global`, the term of the whole global batch (each rank its share);
        # `local`, the term of this rank's own batch (the reference code; DDP averages the ranks).
        self.gather = scope == "global"


@register_loss("instance")
class InstanceTerm(LossTerm):
    """Stage 1: each student embedding against its teacher embedding, summed over the views when
    the stage takes several (`student_views`: the reference's short + raw captions)."""
    needs = ("student", "teacher")

    def forward(self, f: dict) -> dict:
        value = instance_term(f["student"], f["teacher"], self.reduction, gather=self.gather)
        if f.get("student_views") is not None and len(f["student_views"]):
            views = len(f["student_views"]) // len(f["student"])
            for v in range(views):  # per view, as the reference sums one term per view
                rows = slice(v, None, views)
                value = value + instance_term(f["student_views"][rows], f["teacher_views"][rows], self.reduction,
                                              gather=self.gather)
        return {self.term: value}


@register_loss("structure")
class StructureTerm(LossTerm):
    """Stage 1: the in-batch distances of the student against the teacher's (global batch)."""
    needs = ("student", "teacher")

    def forward(self, f: dict) -> dict:
        return {self.term: structure_term(f["student"], f["teacher"], self.reduction, gather=self.gather)}


@register_loss("contrastive")
class ContrastiveTerm(LossTerm):
    """Symmetric InfoNCE between image and text features, local rows against the global batch
    whatever the scope (open_clip's local_loss + gather_with_grad, as the reference)."""
    needs = ("image", "text", "logit_scale")

    def forward(self, f: dict) -> dict:
        return {self.term: infonce_loss(f["image"], f["text"], f["logit_scale"])}


@register_loss("self_distillation")
class SelfDistillationTerm(LossTerm):
    """Stage 2: the image tower against its EMA copy (instance + structure)."""
    needs = ("image", "ema_image")

    def forward(self, f: dict) -> dict:
        total, parts = self_distillation_loss(f["image"], f["ema_image"], self.reduction, gather=self.gather)
        return {self.term: total, **parts}


@register_loss("classification")
class ClassificationTerm(LossTerm):
    """CoOp: cross-entropy of each (normalised) image feature against the step's class-prompt
    embeddings; `target` is each image's place in the step's class list. Logs the top-1 accuracy."""
    needs = ("image", "class_text", "logit_scale", "target")

    def forward(self, f: dict) -> dict:
        logits = f["logit_scale"] * f["image"] @ f["class_text"].T
        accuracy = (logits.argmax(1) == f["target"]).float().mean()
        return {self.term: F.cross_entropy(logits, f["target"]), "train_acc": accuracy}


def _build_term(cls, reduction: str, scope: str, settings: dict, where: str) -> "LossTerm":
    """The term with its own settings, each named in the error when the term does not take it."""
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [key for key in settings if key not in accepted or key in ("self", "reduction", "scope")]
    if unknown and not takes_any:
        options = [k for k in accepted if k not in ("self", "reduction", "scope")]
        raise ConfigError(f"{where}.{unknown[0]}: the {cls.term!r} loss term has no such setting "
                          f"(it takes: weight{''.join(', ' + k for k in options)})")
    try:
        return cls(reduction, scope, **settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


class Objective(nn.Module):
    """sum_k weight_k * term_k over the registered terms named in `weights` (zero weights are
    left out, so their inputs need not be computed). Returns (total, detached log values:
    `loss_<term>` per term plus each term's diagnostics). `where` is the config field of the
    weights (`stage2.losses`); `provides`, the features the task computes: every term's needs
    must be among them."""

    def __init__(self, weights: dict[str, float], reduction: str = "sum", where: str = "losses",
                 provides: Optional[Iterable[str]] = None, task: str = "the task", scope: str = "global"):
        super().__init__()
        classes = {name: LOSS_TERMS.get(name, f"{where}.{name}") for name in weights}
        entries = {name: loss_entry(entry, f"{where}.{name}") for name, entry in weights.items()}
        self.weights = {name: weight for name, (weight, _) in entries.items() if weight != 0}
        if not self.weights:
            raise ConfigError(f"{where}: every loss weight is zero: nothing to train")
        if provides is not None:
            provided = set(provides)
            for name in self.weights:
                missing = [need for need in classes[name].needs if need not in provided]
                if missing:
                    raise ConfigError(f"{where}.{name}: the loss term needs {', '.join(missing)}, which {task} "
                                      f"does not compute (it provides: {', '.join(sorted(provided))})")
        self.terms = nn.ModuleDict({name: _build_term(classes[name], reduction, scope, entries[name][1],
                                                      f"{where}.{name}") for name in self.weights})

    @property
    def needs(self) -> set[str]:
        return {need for term in self.terms.values() for need in term.needs}

    def forward(self, features: dict):
        total, logged = None, {}
        for name, term in self.terms.items():
            out = term(features)
            value = out.pop(name)
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
            logged[f"loss_{name}"] = value.detach()
            logged.update({k: v.detach() for k, v in out.items()})
        return total, logged
