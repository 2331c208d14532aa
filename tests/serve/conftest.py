"""`proalign serve` apps on a real uvicorn server on 127.0.0.1."""
import contextlib
import shutil
import threading
import time

import pytest


@pytest.fixture
def start_server(free_port):
    """start_server(service) -> a context manager: the app over `service` served on 127.0.0.1
    while inside it, yielding its base URL."""
    import uvicorn
    from proalign.serve import create_app

    @contextlib.contextmanager
    def serving(service):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    return serving


@pytest.fixture
def served(trained, tmp_path, start_server):
    """(base URL, service, folder) over a copy of the trained tiny model's six images plus
    `leak.png`, a link to an image outside the folder; uploads capped at 256 KB."""
    from proalign.search import build_index
    from proalign.serve import ServeSettings
    from proalign.serve.app import SearchService
    folder = tmp_path / "images"
    shutil.copytree(trained["folder"], folder)
    shutil.copy(folder / "0.png", tmp_path / "secret.png")
    (folder / "leak.png").symlink_to(tmp_path / "secret.png")
    model = trained["model"]
    index, _ = build_index(model, folder, progress=False)
    service = SearchService(model, index, ServeSettings(max_upload_bytes=256 * 1024), "tiny trained model")
    with start_server(service) as base:
        yield base, service, folder
