import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
    return {"run": run, "folder": folder, "names": names, "model": model}


def run_cli(args, env=None, timeout=600):
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "proalign.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def write_shard(path, members):
    """A tar of (name, bytes) members, in order (bad shards are built from these in tests)."""
    import io
    import tarfile
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
