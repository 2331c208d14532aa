"""MLP adapter M: LLM embedding space (d_llm) -> CLIP embedding space (d_clip)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ResidualMLPBlock(nn.Module):
    """x + FFN(LayerNorm(x)), FFN = Linear(d, r*d) -> GELU -> Dropout -> Linear(r*d, d)."""

    def __init__(self, dim: int, expansion: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(expansion * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class MLPAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_blocks: int = 1, expansion: int = 8, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.blocks = nn.Sequential(*[ResidualMLPBlock(in_dim, expansion, dropout) for _ in range(num_blocks)])
        self.out_norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.out_norm(self.blocks(x)))
