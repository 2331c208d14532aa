"""`proalign serve` over HTTP: the answers agree with `proalign search`, and bad requests get a
4xx with a message (never a traceback, never a file outside the folder)."""
import http.client
import io
import json
from urllib.parse import quote, urlencode, urlsplit

import pytest
from PIL import Image


def _request(base, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request sent with the path exactly as given."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _json(base, method, path, body=None, headers=None):
    status, _, data = _request(base, method, path, body, headers)
    return status, json.loads(data)


def test_text_search_answers_what_proalign_search_does(served, trained):
    from proalign.search import search
    base, service, _ = served
    for query in ("Herz", "一颗心", trained["names"][2]):
        status, answer = _json(base, "GET", "/api/search?" + urlencode({"q": query, "k": 5}))
        assert status == 200
        expected = search(service.model, service.index, [query], 5)[0]
        assert [h["path"] for h in answer["hits"]] == [h.path for h in expected]
        assert [h["score"] for h in answer["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    top = _json(base, "GET", "/api/search?" + urlencode({"q": trained["names"][2], "k": 1}))[1]["hits"][0]
    status, headers, data = _request(base, "GET", top["url"])
    assert status == 200 and headers["content-type"] == "image/png"
    assert data == (served[2] / top["path"]).read_bytes()


def test_the_clip_text_tower_answers_from_the_same_index(served):
    base, service, _ = served
    assert _json(base, "GET", "/api/info")[1]["towers"] == ["llm", "clip"]
    status, answer = _json(base, "GET", "/api/search?" + urlencode({"q": "heart", "tower": "clip", "k": 3}))
    assert status == 200 and answer["tower"] == "clip" and len(answer["hits"]) == 3
    scores = (service.model.encode_text_clip(["heart"]).float() @ service.index.embeddings.T)[0]
    assert answer["hits"][0]["score"] == pytest.approx(float(scores.max()), abs=1e-5)


def test_an_uploaded_image_finds_itself_and_its_label(served, trained):
    base, _, folder = served
    names = trained["names"]
    query = urlencode({"k": 3, "labels": "\n".join(names)})
    status, answer = _json(base, "POST", f"/api/image?{query}", (folder / "3.png").read_bytes(),
                           {"Content-Type": "image/png"})
    assert status == 200, answer
    assert answer["neighbours"][0]["path"] == "3.png" and answer["neighbours"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert answer["labels"][0]["label"] == names[3]
    assert sum(item["probability"] for item in answer["labels"]) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("path", ["/images/../../../../etc/passwd", "/images/..%2f..%2f..%2fetc%2fpasswd",
                                  "/images/%2fetc%2fpasswd", "/images//etc/passwd", "/images/leak.png",
                                  "/images/.proalign-index.safetensors", "/images/missing.png",
                                  "/static/../app.py", "/static/index.html"])
def test_nothing_outside_the_indexed_images_is_served(served, path):
    status, _, data = _request(served[0], "GET", path)
    assert status == 404, (path, status)
    assert b"root:" not in data and b"Traceback" not in data


def test_bad_requests_get_a_4xx_with_a_message(served):
    base = served[0]
    huge = bytes(300 * 1024)  # over the fixture's 256 KB cap
    cases = [
        ("POST", "/api/image", huge, 413, "at most 262144"),
        ("POST", "/api/image", b"this is not an image at all", 400, "not a readable image"),
        ("POST", "/api/image", b"", 400, "empty"),
        ("GET", "/api/search?" + urlencode({"q": "x" * 2001}), None, 413, "at most 2000"),
        ("GET", "/api/search?q=", None, 400, "empty"),
        ("GET", "/api/search?" + urlencode({"q": "a", "k": 0}), None, 400, "between 1 and 50"),
        ("GET", "/api/search?" + urlencode({"q": "a", "k": "many"}), None, 400, "whole number"),
        ("GET", "/api/search?" + urlencode({"q": "a", "tower": "<script>"}), None, 400, "tower must be one of"),
        ("POST", "/api/image?" + urlencode({"labels": "\n".join(f"l{i}" for i in range(51))}), b"x", 413,
         "at most 50"),
    ]
    for method, path, body, status, message in cases:
        got, answer = _json(base, method, path, body)
        assert got == status and message in answer["error"], (path[:60], got, answer)
        assert "Traceback" not in answer["error"]


def test_an_upload_without_a_length_is_capped_as_it_arrives(served):
    """Chunked transfer (no Content-Length): the cap holds while the body is read."""
    parts = urlsplit(served[0])
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", "/api/image", body=iter([bytes(64 * 1024)] * 8), encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 413 and b"over 262144 bytes" in response.read()
    finally:
        connection.close()


def test_a_decompression_bomb_is_refused_by_the_image_guards(served):
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG")  # 144M pixels, a few KB compressed
    status, answer = _json(served[0], "POST", "/api/image", buffer.getvalue())
    assert status == 400 and "not a readable image" in answer["error"]


def test_the_page_names_no_other_host_and_sets_a_content_policy(served):
    base = served[0]
    for path in ("/", "/static/app.js", "/static/style.css"):
        status, headers, data = _request(base, "GET", path)
        assert status == 200
        assert b"http://" not in data and b"https://" not in data and b"//cdn" not in data
    assert "default-src 'self'" in _request(base, "GET", "/")[1]["content-security-policy"]


def test_serve_refuses_a_missing_folder_before_loading_the_model(run_cli, tmp_path):
    proc = run_cli(["serve", "--model", str(tmp_path / "no-model"), "--images", str(tmp_path / "nowhere")])
    assert proc.returncode == 1 and "not a folder of images" in proc.stderr


def test_image_urls_quote_odd_names(served):
    _, service, _ = served
    assert service.image_url("a b/<x>.png") == "/images/" + quote("a b/<x>.png")


def test_proalign_serve_listens_on_localhost_and_reuses_the_search_index(trained, tmp_path, free_port, repo_root):
    """The command itself: it indexes the folder as `proalign search` does (the index file is the
    same), listens on 127.0.0.1 by default, and answers until stopped."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    folder = tmp_path / "images"
    shutil.copytree(trained["folder"], folder)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proalign.cli", "serve", "--model", str(trained["run"]),
                             "--images", str(folder), "--port", str(port), "--device", "cpu", "--no-progress"],
                            cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, info = time.monotonic() + 120, None
        while info is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "proalign serve did not answer"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
                    info = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert info["images"] == trained["images"] and info["towers"] == ["llm", "clip"]
        assert (folder / ".proalign-index.safetensors").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert f"index: {trained['images']} images ({trained['images']} encoded" in output
    assert f"on http://127.0.0.1:{port}/" in output
