import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def tiny_cfg(tmp_path):
    """The committed tiny-cpu config, writing into a temp dir, shards resolved from the repo."""
    from proalign.config import load_config
    os.chdir(ROOT)
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path / 'run'}",
                                                            f"data.cache_dir={tmp_path / 'cache'}"])


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
