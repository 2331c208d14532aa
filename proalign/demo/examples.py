"""The demo's search example: `proalign search` on drawings of a style never trained on, one
concept named in several languages, and where its drawing ranks through each text tower."""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..data.shards import expand_shards
from .evalsets import dataset_name


SEARCH_SPLIT = "styles-test-style"         # Twemoji drawings: a style never trained on
SEARCH_CONCEPTS = ["red apple", "cat face", "dog face", "rocket", "sun"]
SEARCH_LANGUAGES = ["de", "ja", "ar", "sw"]
SEARCH_TOP_K = 5


def export_search_images(shards, folder: Path) -> dict[str, dict]:
    """The split's images as files `<key>.<ext>` (bytes as stored); returns key -> captions."""
    from ..data.shards import IMAGE_EXTS, iter_raw_samples, parse_meta
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for shard in shards:
        for sample in iter_raw_samples(shard):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                continue
            key = sample["__key__"]
            target = folder / f"{key}.{ext}"
            if not target.exists():
                target.write_bytes(sample[ext])
            captions[key] = parse_meta(sample, shard)["captions"]
    return captions


def search_example(cfg: RunConfig, out: Path) -> list[str]:
    """`proalign search` on the Twemoji drawings with the finished run: one concept's name in
    several languages, top-k hits each (a hit is right when it is that concept's drawing)."""
    from ..loading import load
    from ..search import build_index, search
    shards = [sh for sh in expand_shards(cfg.data.eval_shards) if dataset_name(sh) == SEARCH_SPLIT]
    if not shards:
        return [], None
    folder = out / "search-images"
    captions = export_search_images(shards, folder)
    english = {key: caps.get("en", [""])[0] for key, caps in captions.items()}
    key = next((k for c in SEARCH_CONCEPTS for k, name in english.items() if name == c), None)
    if key is None:
        return [], None
    queries = [(lang, captions[key][lang][0]) for lang in SEARCH_LANGUAGES if captions[key].get(lang)]
    model, _, _ = load(out, device="cpu")
    index, counts = build_index(model, folder, progress=False)
    hits = search(model, index, [q for _, q in queries], SEARCH_TOP_K)
    lines = [f"`proalign search {folder.name}/ QUERY --model {out.name}` over the {counts['images']} Twemoji drawings "
             f"of {SEARCH_SPLIT} (a style never trained on). The queries name **{english[key]}** "
             f"(`{key}`) in {len(queries)} languages; ✓ marks that concept's drawing (chance of a ✓ in the top "
             f"{SEARCH_TOP_K}: {SEARCH_TOP_K / counts['images']:.4f}).", "",
             "| language | query | rank | score | image (English name) |", "|---|---|---|---|---|"]
    for (lang, query), found in zip(queries, hits):
        for rank, hit in enumerate(found, 1):
            hit_key = Path(hit.path).stem
            mark = " ✓" if hit_key == key else ""
            lines.append(f"| {lang if rank == 1 else ''} | {query if rank == 1 else ''} | {rank} | {hit.score:+.3f} | "
                         f"`{hit.path}` ({english.get(hit_key, '?')}){mark} |")
    found_at = [next((r for r, h in enumerate(f, 1) if Path(h.path).stem == key), None) for f in hits]
    found = sum(r is not None for r in found_at)
    lines += ["", f"The drawing is in the top {SEARCH_TOP_K} for {found} of {len(queries)} queries.", "",
              *drawing_ranks(model, index, key, [("en", english[key]), *queries])]
    return lines, (found, len(queries))


def drawing_ranks(model, index, key: str, queries: list[tuple[str, str]]) -> list[str]:
    """Where the concept's drawing ranks among all the images for each query, through the LLM
    tower and through the CLIP text tower (what limits a search: the text side or the image side)."""
    target = next((i for i, path in enumerate(index.paths) if Path(path).stem == key), None)
    if target is None:
        return []
    images = index.embeddings.float()  # unit rows, as `search` scores them

    def rank(query_embedding):
        scores = images @ query_embedding.float()
        return int((scores > scores[target]).sum()) + 1
    lines = [f"Rank of the drawing among all {len(index.paths)} images (1 = top):", "",
             "| language | query | LLM tower | CLIP text tower |", "|---|---|---|---|"]
    for lang, query in queries:
        lines.append(f"| {lang} | {query} | {rank(model.encode_text(query))} | "
                     f"{rank(model.encode_text_clip([query])[0])} |")
    return lines + [""]
