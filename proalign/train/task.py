"""The interface a stage implements (`StageTask`); the training loop owns everything else."""
from __future__ import annotations

import abc
from typing import Optional

import torch
import torch.nn as nn

from ..config import TrainConfig


class StageTask(nn.Module, abc.ABC):
    """A stage's training: its modules (trainable or frozen), its batches, the features it computes
    (`provides`, what its loss terms may need) and its loss."""

    name = "stage"
    provides: tuple[str, ...] = ()

    @abc.abstractmethod
    def next_batch(self) -> dict:
        """The next training batch (moved to the device by `forward`)."""

    def features(self, batch: dict) -> dict:
        """The batch's features: tensors with one row per sample, or scalars (a logit scale)."""
        raise NotImplementedError(f"{self.name} does not split its loss into features and loss, so it "
                                  f"cannot accumulate gradients (train.accum_steps)")

    def loss(self, features: dict):
        """(loss, metrics) from `features`."""
        raise NotImplementedError

    def forward(self, batch: dict, accumulated: Optional[tuple[list[dict], int]] = None):
        """(loss, metrics) of the batch. With `accumulated` = (every micro-batch's features computed
        without grad, this batch's place j among them), the loss is that of the whole accumulated
        batch, with gradient through micro-batch j alone (open_clip's `accum_freq`): InfoNCE
        negatives and structure pairs span every micro-batch."""
        features = self.features(batch)
        if accumulated is not None:
            features = merge_accumulated(features, *accumulated)
        return self.loss(features)

    def after_step(self) -> None:
        """Called after every optimizer step (EMA update, clamping)."""

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        """Restore the data position saved by `data_state`."""

    def skip_counts(self) -> dict:
        return {}

    train_cfg: TrainConfig  # steps, batch size, schedule: the one source of both

    def evaluate(self) -> dict:
        """Held-out metrics, run on rank 0 every `train.eval_every` steps (none by default)."""
        return {}

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of the frozen submodules (all parameters without grad), except
        those that change outside the optimizer and say so (`updated_outside_optimizer`: the EMA
        teacher). A frozen embedder, or a CoOp head's frozen adapter, lands here."""
        found: list[str] = []

        def visit(module: nn.Module, prefix: str) -> None:
            if getattr(module, "updated_outside_optimizer", False):
                return
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                found.append(prefix)
                return
            for name, child in module.named_children():
                visit(child, f"{prefix}{name}.")
        for name, child in self.named_children():
            visit(child, f"{name}.")
        return found

    def training_state(self) -> dict[str, torch.Tensor]:
        """What checkpoints and replica checksums hold: the state dict without frozen submodules."""
        frozen = tuple(self.frozen_prefixes())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.training_state())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise KeyError(f"{self.name}: checkpoint does not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.load_state_dict(tensors, strict=False)

    def build_objective(self, weights: dict, reduction: str = "sum", where: str = "losses", scope: str = "global"):
        """The weighted sum of the registered loss terms in `weights` (the config field `where`);
        a term that needs a feature this task does not provide is a ConfigError."""
        from ..losses import Objective
        return Objective(weights, reduction, where, provides=self.provides, task=f"the {self.name} stage",
                         scope=scope)


def merge_accumulated(live: dict, cached: list[dict], index: int) -> dict:
    """Micro-batch `index`'s live features in place of its cached copy, the others cached (no grad).
    Scalars (a logit scale) keep their gradient on the first micro-batch only, so that summing the
    micro-batches' gradients gives the whole batch's gradient exactly once."""
    merged = {}
    for key, value in live.items():
        if value.dim() == 0 or (value.dim() == 1 and value.numel() == 1):
            merged[key] = value if index == 0 else value.detach()
        else:
            merged[key] = torch.cat([value if i == index else part[key] for i, part in enumerate(cached)])
    return merged
