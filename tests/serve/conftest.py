"""A `proalign serve` app on a real uvicorn server on 127.0.0.1, over a copy of the trained tiny
model's image folder (plus a symlink that points outside it)."""
import shutil
import threading
import time

import pytest


@pytest.fixture
def served(trained, tmp_path, free_port):
    """(base URL, service, folder); the folder holds the six trained images and `leak.png`, a link
    to an image outside it."""
    import uvicorn
    from proalign.search import build_index
    from proalign.serve import ServeSettings, create_app
    from proalign.serve.app import SearchService
    folder = tmp_path / "images"
    shutil.copytree(trained["folder"], folder)
    shutil.copy(folder / "0.png", tmp_path / "secret.png")
    (folder / "leak.png").symlink_to(tmp_path / "secret.png")
    model = trained["model"]
    index, _ = build_index(model, folder, progress=False)
    service = SearchService(model, index, ServeSettings(max_upload_bytes=256 * 1024), "tiny trained model")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", service, folder
    finally:
        server.should_exit = True
        thread.join(timeout=10)
