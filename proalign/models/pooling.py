"""Poolers: token states (B, T, D) + attention mask (B, T) -> one vector per text (B, D).

Padding may be on either side. A new pooler is one function here (or in any module imported
before the embedder is built), registered by name; it is then valid as `embedder.pooling`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry

POOLERS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("pooler")
register_pooler = POOLERS.register


def _pick(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


@register_pooler("mean")
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens."""
    mask = mask.to(hidden.dtype)
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


@register_pooler("cls")
def first_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first real token (BERT's [CLS]; with left padding, the first after the padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return _pick(hidden, torch.where(mask > 0, positions, mask.shape[1]).min(1).values)


@register_pooler("last")
def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token (decoder embedders; right or left padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return _pick(hidden, torch.where(mask > 0, positions, -1).max(1).values)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    return POOLERS.get(mode, "embedder.pooling")(hidden, mask)
