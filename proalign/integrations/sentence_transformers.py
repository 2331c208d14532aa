"""A proalign model as a sentence-transformers model: one `SentenceTransformer` whose `encode`
takes strings and PIL images and returns embeddings in one space (unit length, cosine), so
`util.semantic_search`, the evaluators and `similarity` work on text and images alike.

    st = load_sentence_transformer("runs/demo")          # a run folder, model file, hub folder
    st = load_sentence_transformer("hf-hub:org/name")     # or a hub repo
    st.encode(["ein Hund", Image.open("dog.png")])

`st.save(path)` writes a folder that this function (and `proalign.load`) reads back.
sentence-transformers >= 6 imports a module class from outside its own package only with
`trust_remote_code=True`: `SentenceTransformer(path, trust_remote_code=True)` works too (the
class is imported from the installed proalign; the folder holds no code), but
`load_sentence_transformer` needs no such flag, because it accepts a folder whose modules.json
names this module and nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule

from ..errors import ProalignError
from ..loading import find_model_file
from ..models.hub import HF_HUB_PREFIX, HUB_MODEL_FILE, ST_MODULE_TYPE, resolve_hub_name, write_model_files
from ..models.proclip import ProCLIP, clip_embed_dim

# modules.json of a proalign folder is a few hundred bytes; a larger one is not ours.
MAX_MODULES_JSON_BYTES = 64 * 1024


class ProalignEncoder(InputModule):
    """The whole proalign model as the input module of a SentenceTransformer: texts go through the
    LLM embedder and the adapter, images through the CLIP image tower; both come out normalised."""

    save_in_root = True

    def __init__(self, model: ProCLIP):
        super().__init__()
        model._require_text_tower()
        self.model = model.eval()
        self.tokenizer = model.embedder.tokenizer

    @property
    def modalities(self) -> list[str]:
        return ["text", "image"]

    @property
    def max_seq_length(self) -> int:
        return self.model.embedder.max_length

    def get_embedding_dimension(self) -> int:
        return clip_embed_dim(self.model.clip)

    def preprocess(self, inputs, prompt: Optional[str] = None, **kwargs) -> dict[str, Any]:
        """A batch of strings is tokenised (the embedder's role prefix included; `prompt` goes before
        the text), a batch of PIL images preprocessed as in evaluation (sentence-transformers sends one
        modality per batch)."""
        from PIL import Image
        inputs = list(inputs)
        if all(isinstance(item, str) for item in inputs):
            return dict(self.model.tokenize([f"{prompt}{text}" if prompt else text for text in inputs]))
        if all(isinstance(item, Image.Image) for item in inputs):
            return {"pixel_values": torch.stack([self.model.image_tensor(image) for image in inputs])}
        kinds = sorted({type(item).__name__ for item in inputs})
        raise TypeError(f"a proalign model encodes a batch of strings or a batch of PIL images, got {kinds}")

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        if "pixel_values" in features:
            pixels = features["pixel_values"].to(self.model.device)
            embeddings = F.normalize(self.model.clip.encode_image(pixels).float(), dim=-1)
        else:
            llm = self.model.embedder(features["input_ids"], features["attention_mask"])
            embeddings = self.model.encode_llm_features(llm.to(self.model.device)).float()
        features["sentence_embedding"] = embeddings
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        write_model_files(self.model, Path(output_path))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> "ProalignEncoder":
        path = cls.load_file_path(model_name_or_path, filename=HUB_MODEL_FILE, subfolder=subfolder, token=token,
                                  cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        if path is None:
            raise ProalignError(f"{model_name_or_path}: no {HUB_MODEL_FILE} (not a proalign sentence-transformers "
                                "folder)")
        return cls(ProCLIP.from_file(path))


def as_sentence_transformer(model: ProCLIP, device: Optional[str] = None) -> SentenceTransformer:
    """Wrap a loaded proalign model (a stage1, stage2 or coop model) as a SentenceTransformer."""
    return SentenceTransformer(modules=[ProalignEncoder(model)], device=device or str(model.device),
                               similarity_fn_name="cosine")


def _check_modules_json(folder: Path) -> None:
    """A folder's modules.json may name this module only: nothing else it lists is imported."""
    path = folder / "modules.json"
    if path.stat().st_size > MAX_MODULES_JSON_BYTES:
        raise ProalignError(f"{path}: {path.stat().st_size} bytes; a proalign modules.json is one short entry")
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProalignError(f"{path}: not valid JSON ({err})") from None
    types = [m.get("type") if isinstance(m, dict) else m for m in modules] if isinstance(modules, list) else [modules]
    if types != [ST_MODULE_TYPE] or modules[0].get("path", "") != "":
        raise ProalignError(f"{path}: lists modules {types}; a proalign folder has exactly one, {ST_MODULE_TYPE!r} "
                            "at the folder's root (load other sentence-transformers models with SentenceTransformer)")


def load_sentence_transformer(name_or_path: str | Path, device: Optional[str] = None) -> SentenceTransformer:
    """A SentenceTransformer from a proalign hub folder (`save_pretrained`, `proalign export`,
    `SentenceTransformer.save` of one), `hf-hub:org/name[@revision]`, a run folder or a model file.
    No `trust_remote_code`: the folder's modules.json must name the proalign module alone."""
    name = str(name_or_path)
    path = resolve_hub_name(name) if name.startswith(HF_HUB_PREFIX) else Path(name)
    if not path.exists():
        raise ProalignError(f"{path} does not exist (give a proalign folder, a run folder, a model file or "
                            f"{HF_HUB_PREFIX}org/name)")
    if path.is_dir() and (path / "modules.json").is_file():
        _check_modules_json(path)
        model_file = path / HUB_MODEL_FILE
    else:
        model_file = find_model_file(path) if path.is_dir() else path
    model = ProCLIP.from_file(model_file)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return as_sentence_transformer(model.to(device).eval(), device)
