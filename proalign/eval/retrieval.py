"""Image-text retrieval metrics with clip_benchmark's conventions, computed in chunks.

Recall@k text->image: a caption is found when its image ranks in the top k.
Recall@k image->text: an image is found when ANY of its captions ranks in the top k.
Memory is O(chunk^2 + N + M), never O(N * M).
"""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """image_emb (N, d) and text_emb (M, d) normalised; text_to_image (M,) image index of each caption.

    The similarity matrix is visited in (chunk x chunk) blocks, so memory is O(chunk^2 + N + M)."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"retrieval needs images and captions (got {n} images, {m} captions)")
    text_to_image = text_to_image.to(torch.long)
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n:
        raise ValueError("text_to_image holds an index outside the image set")
    # score of each caption with its own image, and each image's best own caption
    correct = torch.cat([(text_emb[t0:t0 + chunk] * image_emb[text_to_image[t0:t0 + chunk]]).sum(-1)
                         for t0 in range(0, m, chunk)])
    best_own = torch.full((n,), float("-inf"), dtype=correct.dtype)
    best_own.scatter_reduce_(0, text_to_image, correct, reduce="amax")
    t2i_rank = torch.zeros(m, dtype=torch.long)
    i2t_rank = torch.zeros(n, dtype=torch.long)
    # Block buffers reused across the loop: no per-block allocation, so resident memory does not
    # depend on how the allocator recycles freed blocks.
    rows, cols = min(chunk, m), min(chunk, n)
    scores_buf = torch.empty(rows, cols, dtype=correct.dtype)
    beats_buf = torch.empty(rows, cols, dtype=torch.bool)
    other_buf = torch.empty(rows, cols, dtype=torch.bool)
    image_index = torch.arange(n)
    for t0 in range(0, m, chunk):
        text_block = text_emb[t0:t0 + chunk]
        ct = text_block.shape[0]
        owners = text_to_image[t0:t0 + ct, None]
        for i0 in range(0, n, chunk):
            image_block = image_emb[i0:i0 + chunk]
            ci = image_block.shape[0]
            scores, beats, other = scores_buf[:ct, :ci], beats_buf[:ct, :ci], other_buf[:ct, :ci]
            torch.mm(text_block, image_block.T, out=scores)
            # own pairs never outrank themselves (a matmul and a row-wise dot may differ by an ulp)
            torch.ne(owners, image_index[None, i0:i0 + ci], out=other)
            torch.gt(scores, correct[t0:t0 + ct, None], out=beats).logical_and_(other)
            t2i_rank[t0:t0 + ct] += beats.sum(1)
            torch.gt(scores, best_own[None, i0:i0 + ci], out=beats).logical_and_(other)
            i2t_rank[i0:i0 + ci] += beats.sum(0)
    has_caption = torch.isfinite(best_own)
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
