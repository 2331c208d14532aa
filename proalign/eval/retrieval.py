"""Image-text retrieval metrics with clip_benchmark's conventions, computed in chunks.

Recall@k text->image: a caption is found when its image ranks in the top k.
Recall@k image->text: an image is found when ANY of its captions ranks in the top k.
Memory is O(chunk * max(N, M)), never O(N * M).
"""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """image_emb (N, d) and text_emb (M, d) normalised; text_to_image (M,) image index of each caption."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"retrieval needs images and captions (got {n} images, {m} captions)")
    text_to_image = text_to_image.to(torch.long)
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n:
        raise ValueError("text_to_image holds an index outside the image set")
    t2i_rank = torch.empty(m, dtype=torch.long)
    for start in range(0, m, chunk):
        scores = text_emb[start:start + chunk] @ image_emb.T  # (c, N)
        target = text_to_image[start:start + chunk]
        correct = scores.gather(1, target[:, None])
        t2i_rank[start:start + chunk] = (scores > correct).sum(1)
    i2t_rank = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk):
        scores = image_emb[start:start + chunk] @ text_emb.T  # (c, M)
        idx = torch.arange(start, min(start + chunk, n))
        own = text_to_image[None, :] == idx[:, None]
        best_own = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        i2t_rank[start:start + chunk] = (scores > best_own).sum(1)
    has_caption = torch.zeros(n, dtype=torch.bool)
    has_caption[text_to_image] = True
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
        out[f"i2t_R@{k}"] = (i2t_rank[has_caption] < k).float().mean().item()
    return out


@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Top-k accuracy of nearest class prompt; class_emb (C, d), labels (N,) class indices."""
    scores = image_emb @ class_emb.T
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"acc@{k}"] = (top == labels[:, None]).any(1).float().mean().item()
    return out
