"""Shards in an S3 bucket (moto's standalone S3 server on 127.0.0.1, read through fsspec's s3fs)
cache, are found again by their ETag without being read, and stream for training."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch


@pytest.fixture
def s3_server(free_port, monkeypatch):
    """moto's S3 server on a free local port; the AWS client settings point at it."""
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint),
                       ("FSSPEC_S3_ENDPOINT_URL", endpoint)):
        monkeypatch.setenv(key, value)
    import urllib.request
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_shards_in_s3_cache_are_found_by_etag_and_stream(s3_server, write_shard, image_text_members, tmp_path):
    import s3fs
    import torchvision.transforms as T
    from proalign.data.cache import EmbeddingCache
    from proalign.data.shards import ImageTextStream
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("shards")
    local = write_shard(tmp_path / "emoji-000.tar", image_text_members(4))
    fs.put(str(local), "shards/emoji-000.tar")
    url = "s3://shards/emoji-000.tar"
    encode = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])  # noqa: E731
    cache = EmbeddingCache(tmp_path / "cache", "llm", "5" * 16)
    assert cache.build([url], encode, progress=False)["captions_encoded"] == 4
    assert cache.build([url], encode, progress=False) == {"shards_reused": 1}
    ids, _, extras = cache.load([url])
    assert len(ids) == 4 and extras["shard_samples"] == {url: 4}
    stream = ImageTextStream([url], T.ToTensor(), ["en"], seed=0, shuffle_buffer=1)
    first = next(iter(stream))
    assert first["text"].startswith("cap ") and first["image"].shape == (3, 8, 8)
