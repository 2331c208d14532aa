"""Image-text retrieval metrics with clip_benchmark's conventions, computed in chunks.

Recall@k text->image: a caption is found when its image ranks in the top k.
Recall@k image->text: an image is found when ANY of its captions ranks in the top k.
Memory is O(chunk^2 + N + M), never O(N * M).

Ties: scores are compared in float64, and two scores within `TIE_TOLERANCE` of each other are
equal; equal scores rank by index, the lowest first (what clip_benchmark's `topk` gives). So a
duplicated image, or a caption repeated for two images, counts as a hit for the first of the two
only, and the result does not depend on the chunk size.
"""
from __future__ import annotations

from typing import Sequence

import torch

# float64 dot products of float32 inputs differ by ~1e-16 between kernels (block shapes);
# genuine float32 cosine differences are far larger than this.
TIE_TOLERANCE = 1e-9


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
    tol = TIE_TOLERANCE
    # score of each caption with its own image ...
    correct = torch.cat([(text_emb[t0:t0 + chunk].double() * image_emb[text_to_image[t0:t0 + chunk]].double()).sum(-1)
                         for t0 in range(0, m, chunk)])
    # ... each image's best own caption, and the lowest index among its own captions tied for best
    best_own = torch.full((n,), float("-inf"), dtype=torch.float64)
    best_own.scatter_reduce_(0, text_to_image, correct, reduce="amax")
    caption_index = torch.arange(m)
    tied_for_best = torch.where(correct >= best_own[text_to_image] - tol, caption_index, m)
    best_caption = torch.full((n,), m, dtype=torch.long).scatter_reduce_(0, text_to_image, tied_for_best, "amin")
    t2i_rank = torch.zeros(m, dtype=torch.long)
    i2t_rank = torch.zeros(n, dtype=torch.long)
    # Block buffers reused across the loop: no per-block allocation, so resident memory does not
    # depend on how the allocator recycles freed blocks.
    rows, cols = min(chunk, m), min(chunk, n)
    scores_buf = torch.empty(rows, cols, dtype=torch.float64)
    beats_buf = torch.empty(rows, cols, dtype=torch.bool)
    tie_buf = torch.empty(rows, cols, dtype=torch.bool)
    other_buf = torch.empty(rows, cols, dtype=torch.bool)
    image_index = torch.arange(n)
    # each caption's top-1 image (lowest index among ties), for the share of the most-chosen image
    top_score = torch.full((m,), float("-inf"), dtype=torch.float64)
    top_image = torch.zeros(m, dtype=torch.long)
    for t0 in range(0, m, chunk):
        text_block = text_emb[t0:t0 + chunk].double()
        ct = text_block.shape[0]
        owners = text_to_image[t0:t0 + ct, None]
        captions = caption_index[t0:t0 + ct, None]
        for i0 in range(0, n, chunk):
            image_block = image_emb[i0:i0 + chunk].double()
            ci = image_block.shape[0]
            images = image_index[None, i0:i0 + ci]
            scores, beats, tie, other = scores_buf[:ct, :ci], beats_buf[:ct, :ci], tie_buf[:ct, :ci], other_buf[:ct, :ci]
            torch.mm(text_block, image_block.T, out=scores)
            block_top, block_arg = scores.max(1)
            better = block_top > top_score[t0:t0 + ct] + tol
            top_score[t0:t0 + ct] = torch.where(better, block_top, top_score[t0:t0 + ct])
            top_image[t0:t0 + ct] = torch.where(better, block_arg + i0, top_image[t0:t0 + ct])
            torch.ne(owners, images, out=other)
            # text->image: another image outranks the caption's own if it scores higher, or ties
            # and comes first
            own = correct[t0:t0 + ct, None]
            torch.gt(scores, own + tol, out=beats)
            torch.ge(scores, own - tol, out=tie).logical_and_(images < owners)
            t2i_rank[t0:t0 + ct] += beats.logical_or_(tie).logical_and_(other).sum(1)
            # image->text: another image's caption outranks the image's best own caption
            best = best_own[None, i0:i0 + ci]
            torch.gt(scores, best + tol, out=beats)
            torch.ge(scores, best - tol, out=tie).logical_and_(captions < best_caption[None, i0:i0 + ci])
            i2t_rank[i0:i0 + ci] += beats.logical_or_(tie).logical_and_(other).sum(0)
    has_caption = torch.isfinite(best_own)
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
        out[f"i2t_R@{k}"] = (i2t_rank[has_caption] < k).float().mean().item()
    # a hub: one image that is many captions' first answer (a shared caption stretch, a degenerate tower)
    out["t2i_top1_max_share"] = torch.bincount(top_image, minlength=n).max().item() / m
    return out


def recall_uncertainty(metrics: dict[str, float], text_to_image: torch.Tensor, n_images: int) -> dict[str, float]:
    """Standard error and chance level of every `{t2i,i2t}_R@k` in `metrics`.

    A recall is a mean of per-query hits, so its standard error is sqrt(p(1-p)/n) with n the
    captions (t2i) or the images that have a caption (i2t). Chance: t2i R@k = k/N; i2t R@k is the
    mean over images of 1 - C(M-c, k)/C(M, k), an image with c of the M captions being found by a
    random ranking."""
    owners = text_to_image.to(torch.long)
    m = len(owners)
    per_image = torch.bincount(owners, minlength=n_images)
    per_image = per_image[per_image > 0].double()
    out = {}
    for key, value in metrics.items():
        if "_R@" not in key:  # not a recall (the top-1 share)
            continue
        direction, k = key.split("_R@")
        k = int(k)
        if direction == "t2i":
            n, chance = m, min(1.0, k / n_images)
        else:
            n = len(per_image)
            miss = torch.ones_like(per_image)  # P(no own caption in the top k), sampling without replacement
            for i in range(min(k, m)):
                miss = miss * ((m - per_image - i).clamp_min(0) / (m - i))
            chance = float((1 - miss).mean())
        out[f"{key}_se"] = (value * (1 - value) / max(1, n)) ** 0.5
        out[f"{key}_chance"] = chance
    return out
