"""Fixtures shared by the whole suite (the only place they live): the repository root, the CLI in
a subprocess, shard writing, free ports, the float64 loss oracles, the tiny config with its
session-wide embedding cache, and a tiny trained model."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


# ----------------------------------------------------------------------------- float64 oracles

def _norm64(x):
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_instance(s, t, reduction):
    per = ((_norm64(s) - _norm64(t)) ** 2).sum(1)
    return per.sum() if reduction == "sum" else per.mean()


def _ref_structure(s, t, reduction="sum"):
    s, t = _norm64(s), _norm64(t)
    n = len(s)
    ds = [np.linalg.norm(s[i] - s[j]) for i in range(n) for j in range(i + 1, n)]
    dt = [np.linalg.norm(t[i] - t[j]) for i in range(n) for j in range(i + 1, n)]
    diff = np.abs(np.array(ds) - np.array(dt))
    per_pair = np.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5)
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def _ref_infonce(img, txt, scale):
    i, t = _norm64(img), _norm64(txt)
    logits = scale * i @ t.T

    def ce(lg):
        lg = lg - lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return -np.mean(np.diag(logp))
    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.fixture(scope="session")
def oracle():
    """The paper's losses in float64 numpy, written from the formulas: `oracle.instance(s, t, reduction)`,
    `oracle.structure(s, t, reduction)`, `oracle.infonce(image, text, scale)`."""
    from types import SimpleNamespace
    return SimpleNamespace(instance=_ref_instance, structure=_ref_structure, infonce=_ref_infonce)


@pytest.fixture(scope="session")
def free_port():
    """() -> a TCP port free right now on localhost (for a process group's master)."""
    import socket

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    return pick


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """The tiny config's embedding caches (LLM + CLIP teacher, English), built once per session.
    Tests and the CLI runs they start read it; a test that edits or times a cache uses its own."""
    import torch
    from proalign.config import load_config
    from proalign.models.proclip import ProCLIP
    from proalign.stages.cache import build_caches
    os.chdir(ROOT)
    root = tmp_path_factory.mktemp("shared")
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [f"output_dir={root / 'run'}",
                                                           f"data.cache_dir={root / 'cache'}"])
    torch.manual_seed(cfg.seed)  # the stage drivers build their models after the same seeding
    build_caches(cfg, ProCLIP.from_config(cfg), progress=False)
    return root / "cache"


@pytest.fixture
def tiny_cfg(tmp_path, shared_cache):
    """The committed tiny-cpu config, writing into a temp dir, shards resolved from the repo,
    reading the session's shared embedding cache."""
    from proalign.config import load_config
    os.chdir(ROOT)
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path / 'run'}",
                                                            f"data.cache_dir={shared_cache}"])


TRAINED_IMAGES = 6
TRAINED_STEPS = 150


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model whose image tower and adapter learned six emoji and their English names
    (InfoNCE to convergence), saved as a run folder's stage2.safetensors; the six images as files."""
    import torch
    from proalign.config import load_config
    from proalign.data.shards import decode_image, iter_raw_samples, parse_meta
    from proalign.losses import infonce_loss
    from proalign.models.proclip import ProCLIP
    root = tmp_path_factory.mktemp("trained")
    os.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [f"output_dir={root / 'run'}"])
    torch.manual_seed(0)
    model = ProCLIP.from_config(cfg)
    folder = root / "images"
    folder.mkdir()
    names, images = [], []
    for position, sample in enumerate(iter_raw_samples(cfg.data.train_shards[0])):
        if position % 97:  # spread over the shard: neighbours (‼ and ⁉) look alike at 32 px
            continue
        name = parse_meta(sample, "test")["captions"]["en"][0]
        image = decode_image(sample)
        image.save(folder / f"{len(names)}.png")
        names.append(name)
        images.append(model.preprocess_eval(image))
        if len(names) == TRAINED_IMAGES:
            break
    pixels = torch.stack(images)
    llm = model.embedder.encode(names)
    params = list(model.clip.visual.parameters()) + list(model.adapter.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    scale = torch.tensor(50.0)
    for _ in range(TRAINED_STEPS):
        image_emb = torch.nn.functional.normalize(model.clip.encode_image(pixels), dim=-1)
        loss = infonce_loss(image_emb, model.encode_llm_features(llm), scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = root / "run"
    run.mkdir()
    model.eval()
    model.save(run / "stage2.safetensors", {"stage": "stage2"})
    return {"run": run, "folder": folder, "names": names, "model": model, "images": len(names)}


def _run_cli(args, env=None, timeout=600, code=None):
    """`python -m proalign.cli ARGS` in the repository, or with `code`, `python -c CODE ARGS` (a
    launcher that sets up a hook, then calls the CLI with sys.argv[1:])."""
    import subprocess
    full_env = {**os.environ, **(env or {})}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "proalign.cli"]
    return subprocess.run([*command, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_cli():
    """run_cli(args, env=None, timeout=600, code=None) -> the finished subprocess (text output)."""
    return _run_cli


# A launcher for `run_cli(..., code=KILL_AT_STEP.format(step=N))`: the run is SIGKILLed after step N.
KILL_AT_STEP = ("import os, signal, sys; from proalign.train import loop; from proalign.cli import main; "
                "loop.STEP_HOOKS.append(lambda step: step == {step} and os.kill(os.getpid(), signal.SIGKILL)); "
                "sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="session")
def kill_at_step():
    """kill_at_step(N) -> launcher code for run_cli(code=...) that SIGKILLs the run after step N."""
    return lambda step: KILL_AT_STEP.format(step=int(step))


def _write_shard(path, members):
    """A tar of (name, bytes) members, in order (bad shards are built from these in tests)."""
    import io
    import tarfile
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def write_shard():
    """write_shard(path, [(member name, bytes), ...]) -> path."""
    return _write_shard


def _image_text_members(n, start=0, captions=None):
    """(member name, bytes) of `n` samples `s<i>`: an 8x8 JPEG and proalign's JSON with English
    caption `cap <i>` (or `captions(i)` -> {language: [texts]})."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    out = []
    for i in range(start, start + n):
        meta = {"captions": captions(i) if captions else {"en": [f"cap {i}"]}}
        out += [(f"s{i:03d}.jpg", buf.getvalue()), (f"s{i:03d}.json", json.dumps(meta).encode())]
    return out


@pytest.fixture(scope="session")
def image_text_members():
    """image_text_members(n, start=0, captions=None) -> shard members of n small samples."""
    return _image_text_members


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a fresh folder (Content-Length and Last-Modified on
    every answer, HEAD included): yields (folder, base URL); stopped after the test."""
    import functools
    import http.server
    import threading
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def range_server(tmp_path):
    """A real HTTP server on 127.0.0.1 that answers Range requests (206 with Content-Range), as
    object stores and CDNs do, and keeps a log of every GET as (file name, first byte, end).
    `cut[name] = n` makes it stop after n bytes of that file while announcing its full length (a
    download cut short). Yields (folder, base URL, log, cut)."""
    import http.server
    import re
    import threading
    folder = tmp_path / "ranged"
    folder.mkdir()
    log, cut = [], {}

    class Ranged(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bool):
            path = folder / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            first, end, status = 0, len(data), 200
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if wanted:
                first = int(wanted.group(1))
                end = min(len(data), int(wanted.group(2)) + 1) if wanted.group(2) else len(data)
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - first))
            self.send_header("ETag", f'"{len(data)}-{int(path.stat().st_mtime_ns)}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{end - 1}/{len(data)}")
            self.end_headers()
            if body:
                log.append((path.name, first, end))
                self.wfile.write(data[first:min(end, first + cut.get(path.name, len(data)))])

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ranged)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", log, cut
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- small datasets on disk
# Four classes of flat-colour images (shades per image), as an image folder and as a CoOp split.

TOY_CLASSES = ["golden_retriever", "red_fox", "tabby_cat", "zebra"]


TOY_COLOURS = {"golden_retriever": (200, 160, 60), "red_fox": (200, 60, 30), "tabby_cat": (120, 120, 120),
           "zebra": (20, 20, 20)}


TOY_PER_CLASS = 4


def _toy_image(path, colour, shade):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), tuple(min(255, c + 10 * shade) for c in colour)).save(path)


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    for cls in TOY_CLASSES:
        for i in range(TOY_PER_CLASS):
            _toy_image(root / cls / f"{i}.png", TOY_COLOURS[cls], i)
    names = tmp_path / "classnames"
    names.mkdir()
    (names / "de.txt").write_text("golden_retriever Golden Retriever\nred_fox Rotfuchs\ntabby_cat Tigerkatze\n"
                                  "zebra Zebra\n", encoding="utf-8")
    (names / "ja.json").write_text(json.dumps(["ゴールデンレトリバー", "アカギツネ", "トラ猫", "シマウマ"]), encoding="utf-8")
    return root, names


@pytest.fixture
def coop_split(tmp_path):
    root = tmp_path / "coopdata"
    entries = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(TOY_CLASSES):
        for i in range(TOY_PER_CLASS):
            rel = f"{cls}/{i}.png"
            _toy_image(root / "images" / rel, TOY_COLOURS[cls], i)
            entries["train" if i < 2 else "val" if i == 2 else "test"].append([rel, label + 10, cls])
    (root / "split_zhou_Toy.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def toy_classes():
    """The classes of `imagefolder` and `coop_split`, and their images per class."""
    from types import SimpleNamespace
    return SimpleNamespace(names=list(TOY_CLASSES), per_class=TOY_PER_CLASS)


@pytest.fixture
def model_file(tiny_cfg, tmp_path):
    import torch
    from proalign.models.proclip import ProCLIP
    torch.manual_seed(0)
    path = tmp_path / "stage2.safetensors"
    ProCLIP.from_config(tiny_cfg).save(path, {"stage": "stage2"})
    return path


def _jpg(path: Path, colour=(200, 30, 30)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


@pytest.fixture(scope="session")
def write_jpg():
    """write_jpg(path, colour=(200, 30, 30)): a 16x16 JPEG (folders made)."""
    return _jpg


@pytest.fixture(scope="session")
def urban1k():
    """urban1k(root) -> root: an Urban-1k layout with two captioned images."""
    return _urban1k


def _urban1k(root: Path) -> Path:
    for n, text in [(1, "A long street scene with a red tram."), (2, "A square with many pigeons.")]:
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{n}.txt").write_text(text + "\n")
        _jpg(root / "image" / f"{n}.jpg")
    return root


def _rewrite_stored_config(model_file: Path, out: Path, edit) -> Path:
    """A copy of a model file whose stored config went through `edit(sections)`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(model_file), "pt") as handle:
        metadata = dict(handle.metadata())
    sections = json.loads(metadata["proalign_config"])
    edit(sections)
    metadata["proalign_config"] = json.dumps(sections)
    save_file(load_file(str(model_file)), str(out), metadata=metadata)
    return out


@pytest.fixture(scope="session")
def rewrite_stored_config():
    """rewrite_stored_config(model file, out, edit) -> out: a copy whose stored config went through edit(sections)."""
    return _rewrite_stored_config
