"""The demo's evaluation sets: the benchmark's splits, decoded once (the long-caption split among
them)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..config import RunConfig
from ..data.cache import CachedTextFeatures
from ..data.shards import expand_shards
from ..eval.evaluator import EvalSet, Evaluator, clip_text_tower, image_encoder, llm_text_tower, load_shard_set
from ..models.proclip import ProCLIP
from ..models.towers import context_length, count_truncated


def dataset_name(shard: str) -> str:
    """`data_shards/styles-test-style-001.tar` -> `styles-test-style`."""
    return Path(shard).name.rsplit("-", 1)[0]


# The long-caption split (data_shards/README.md): each image's long multilingual gloss ends with the
# concept's name after NAME_SEPARATOR, past the teacher's 77-token cut.
LONG_SPLIT = "styles-long-test"
NAME_SEPARATOR = " — "


def names_past_the_cut(tokenizer, context: int, captions: Sequence[str]) -> int:
    """How many `captions` reach their name (after the last NAME_SEPARATOR) only past `context`
    tokens (start and end tokens included): a tower cut there never reads the name."""
    heads = [c.rsplit(NAME_SEPARATOR, 1)[0] for c in captions if NAME_SEPARATOR in c]
    return count_truncated(tokenizer, heads, context - 1) if heads else 0


class DemoEvaluation:
    """The demo's eval sets, decoded once, and the rows of every model."""

    def __init__(self, cfg: RunConfig, model: ProCLIP, llm_features: CachedTextFeatures, languages,
                 progress: bool = False, clip_features: Optional[CachedTextFeatures] = None):
        self.model, self.llm_features, self.clip_features = model, llm_features, clip_features
        groups: dict[str, list[str]] = {}
        for shard in expand_shards(cfg.data.eval_shards):
            groups.setdefault(dataset_name(shard), []).append(shard)
        sets = [load_shard_set(name, shards, model.preprocess_eval, languages, cfg.data.max_eval_samples)
                for name, shards in groups.items()]
        self.evaluator = Evaluator(sets, progress)
        self.split_names = [s.name for s in sets]
        long_set = next((s for s in sets if s.name == LONG_SPLIT), None)
        # per language: (captions, how many of them name their concept only past the teacher's cut)
        self.long_names_cut = {lang: (len(texts), names_past_the_cut(model.clip_tokenizer, context_length(model.clip), texts))
                               for lang, texts in _texts_by_language(long_set).items()} if long_set else {}
        self.rows: list[dict] = []

    @property
    def sets(self) -> dict[str, EvalSet]:
        return {name: self.evaluator.sets[name] for name in self.split_names}

    def run(self, label: str, with_clip_text: bool = False) -> None:
        """Every split with the cached LLM features, plus the CLIP text tower when `with_clip_text`."""
        model = self.model
        model.eval()
        towers = [clip_text_tower(model, cache=self.clip_features)] if with_clip_text else []
        towers.append(llm_text_tower(model, label, self.llm_features))
        self.rows += self.evaluator.evaluate(image_encoder(model), towers, list(self.split_names))


def _texts_by_language(s: EvalSet) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in s.keys:
        for lang, texts in s.metas[key]["captions"].items():
            if not s.languages or lang in s.languages:
                out.setdefault(lang, []).extend(texts)
    return out
