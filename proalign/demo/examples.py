"""The demo's search example: `proalign search` over a personal-folder-sized gallery of drawings in
a style never trained on, with queries in several languages fixed before any result was seen, and
where each query's drawing ranks through each text tower."""
from __future__ import annotations

import random
from pathlib import Path

from ..config import RunConfig
from ..data.shards import expand_shards
from .evalsets import dataset_name


SEARCH_SPLIT = "styles-test-style"         # Twemoji drawings: a style never trained on
# (concept by its English CLDR name, language of the query): written down before any search ran;
# the query is the concept's CLDR name in that language.
SEARCH_QUERIES = [("red apple", "de"), ("cat face", "ja"), ("rocket", "ar"), ("sun", "sw"),
                  ("dog face", "zh"), ("pizza", "es"), ("bicycle", "hi"), ("umbrella", "ru")]
SEARCH_GALLERY = 200  # drawings in the folder: the queries' own plus others drawn with a fixed seed
SEARCH_TOP_K = 5


def gallery_keys(english: dict[str, str], wanted: list[str], size: int = SEARCH_GALLERY, seed: int = 0) -> list[str]:
    """The wanted concepts' keys (by English name) plus a seeded draw of the others, `size` in all."""
    own = [k for name in wanted for k, n in english.items() if n == name][:size]
    others = sorted(k for k in english if k not in own)
    return sorted(own + random.Random(seed).sample(others, max(0, min(len(others), size - len(own)))))


def export_search_images(shards, folder: Path, keep=None) -> dict[str, dict]:
    """The split's images (those with a key in `keep`, or all) as files `<key>.<ext>` (bytes as
    stored); returns key -> captions of every sample."""
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
            if (keep is None or key in keep) and not target.exists():
                target.write_bytes(sample[ext])
            captions[key] = parse_meta(sample, shard)["captions"]
    return captions


def search_example(cfg: RunConfig, out: Path) -> list[str]:
    """`proalign search` with the finished run over SEARCH_GALLERY Twemoji drawings: each of
    SEARCH_QUERIES names a concept in its language; its top-k hits (a hit is right when it is that
    concept's drawing) and where the drawing ranks through each text tower."""
    from ..data.shards import iter_raw_samples, parse_meta
    from ..loading import load
    from ..search import build_index, search
    shards = [sh for sh in expand_shards(cfg.data.eval_shards) if dataset_name(sh) == SEARCH_SPLIT]
    if not shards:
        return [], None
    captions = {sample["__key__"]: parse_meta(sample, shard)["captions"]
                for shard in shards for sample in iter_raw_samples(shard)}
    english = {key: caps.get("en", [""])[0] for key, caps in captions.items()}
    by_name = {name: key for key, name in english.items()}
    asked = [(by_name[name], lang) for name, lang in SEARCH_QUERIES
             if name in by_name and captions[by_name[name]].get(lang)]
    if not asked:
        return [], None
    keep = set(gallery_keys(english, [english[k] for k, _ in asked]))
    folder = out / "search-images"
    export_search_images(shards, folder, keep)
    queries = [(key, lang, captions[key][lang][0]) for key, lang in asked]
    model, _, _ = load(out, device="cpu")
    index, counts = build_index(model, folder, progress=False)
    hits = search(model, index, [q for _, _, q in queries], SEARCH_TOP_K)
    n = counts["images"]
    lines = [f"`proalign search {folder.name}/ QUERY --model {out.name}` over a folder of {n} Twemoji drawings "
             f"(a style never trained on; {len(queries)} concepts named by the queries and {n - len(queries)} others "
             f"drawn with a fixed seed). The {len(queries)} queries, each a concept's CLDR name in one language, were "
             f"fixed before any search ran. ✓ marks the named concept's drawing (chance of a ✓ in the top "
             f"{SEARCH_TOP_K}: {SEARCH_TOP_K / n:.3f}).", "",
             "| language | query (concept) | rank | score | image (English name) |", "|---|---|---|---|---|"]
    for (key, lang, query), found in zip(queries, hits):
        for rank, hit in enumerate(found, 1):
            hit_key = Path(hit.path).stem
            mark = " ✓" if hit_key == key else ""
            first = rank == 1
            lines.append(f"| {lang if first else ''} | {f'{query} ({english[key]})' if first else ''} | {rank} | "
                         f"{hit.score:+.3f} | `{hit.path}` ({english.get(hit_key, '?')}){mark} |")
    found = sum(any(Path(h.path).stem == key for h in f) for (key, _, _), f in zip(queries, hits))
    lines += ["", f"The named drawing is in the top {SEARCH_TOP_K} for {found} of {len(queries)} queries.", "",
              *drawing_ranks(model, index, [(key, lang, query) for key, lang, query in queries]
                             + [(key, "en", english[key]) for key, _, _ in queries])]
    return lines, (found, len(queries))


def drawing_ranks(model, index, queries: list[tuple[str, str, str]]) -> list[str]:
    """Where each query's drawing (key, language, query) ranks among all the images, through the
    LLM tower and through the CLIP text tower (what limits a search: the text side or the image
    side); the English names come last, as the reference."""
    position = {Path(path).stem: i for i, path in enumerate(index.paths)}
    images = index.embeddings.float()  # unit rows, as `search` scores them

    def rank(query_embedding, target):
        scores = images @ query_embedding.float()
        return int((scores > scores[target]).sum()) + 1
    lines = [f"Rank of the named drawing among all {len(index.paths)} images (1 = top):", "",
             "| language | query | LLM tower | CLIP text tower |", "|---|---|---|---|"]
    for key, lang, query in queries:
        if key in position:
            lines.append(f"| {lang} | {query} | {rank(model.encode_text(query), position[key])} | "
                         f"{rank(model.encode_text_clip([query])[0], position[key])} |")
    return lines + [""]
