"""The learnable CLIP temperature of the contrastive stages."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class LogitScale(nn.Module):
    """Learnable inverse temperature, stored as a log in a (1,)-shaped parameter (DeepSpeed
    cannot broadcast 0-dim parameters) and clamped to [ln minimum, ln maximum] after each
    optimizer step; the reference clamps the log to [0, ln 100]."""

    def __init__(self, init: float = 1.0 / 0.07, maximum: float = 100.0, minimum: float = 1.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), math.log(init)))
        self.min_log, self.max_log = math.log(minimum), math.log(maximum)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(self.min_log, self.max_log)

    @torch.no_grad()
    def export_to(self, clip: nn.Module) -> None:
        """Write the learned value into an open_clip model's 0-dim `logit_scale` (re-created if
        it was removed for DeepSpeed)."""
        value = self.log_scale.detach().squeeze().clone()
        current = getattr(clip, "logit_scale", None)
        if isinstance(current, torch.Tensor):
            current.copy_(value.to(current.device))
        else:
            clip.logit_scale = nn.Parameter(value)
