"""Exponential moving average copy of a module (the stage-2 image teacher)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMATeacher(nn.Module):
    """theta_bar <- m * theta_bar + (1 - m) * theta after each optimizer step; m = 1 keeps it frozen."""

    updated_outside_optimizer = True  # frozen to the optimizer, yet part of the training state
    # An average of many small steps: kept in float32 whatever the training precision (in bf16,
    # (1 - 0.999) * delta rounds away and the teacher never moves). Backends cast it back.
    keeps_float32 = True

    def __init__(self, module: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"stage2.ema_momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        if self.momentum == 1.0:
            return
        ema = [p for p in self.module.parameters()]
        cur = [p.detach().to(e.dtype) for p, e in zip(module.parameters(), ema)]
        torch._foreach_lerp_(ema, cur, 1.0 - self.momentum)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's output for `x`, in `x`'s dtype (the teacher itself runs in its own)."""
        dtype = next(self.module.parameters()).dtype
        return self.module(x.to(dtype)).to(x.dtype)
