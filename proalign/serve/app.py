"""The web app behind `proalign serve` (FastAPI + one static page, no assets from elsewhere).

Routes: `/` (the page), `/static/*` (its script and style), `/api/info`, `/api/search?q=&k=&tower=`
(text -> images), `POST /api/image?k=&tower=&labels=` with the image's bytes as the body (nearest
images, and the best of the labels typed, zero-shot), `/images/<path>` (an indexed image).

Safe by default: it listens on 127.0.0.1; only images in the index are served (a request names a
path, which must be one the index holds, resolving inside the folder); uploads are capped while
they are read and decoded with the same size guards as the index; queries and labels are capped;
the page renders every text as text, never as HTML; a bad request gets a 4xx JSON message, and
an unexpected error a 500 with the error's type only (its traceback goes to the server's log).
"""

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import torch

from ..errors import ProalignError
from ..search import Hit, ImageIndex, display_path, index_folder, search, top_hits

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """Limits of what one request may ask."""
    max_query_chars: int = 2000        # long captions are the point; a book is not
    max_upload_bytes: int = 10 * 2 ** 20
    max_top_k: int = 50
    max_labels: int = 50
    max_label_chars: int = 200


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def text_towers(model) -> list[str]:
    """The text towers this model file has: `llm` (embedder + adapter) and `clip` (CLIP's own)."""
    towers = []
    if model.embedder is not None and model.adapter is not None:
        towers.append("llm")
    if hasattr(model.clip, "encode_text"):
        towers.append("clip")
    return towers


class SearchService:
    """What the routes do, apart from HTTP: checks of each request's values, then the model."""

    def __init__(self, model, index: ImageIndex, settings: ServeSettings, model_name: str):
        self.model, self.index, self.settings, self.model_name = model, index, settings, model_name
        self.towers = text_towers(model)
        self.root = index.root.resolve()
        self.paths = set(index.paths)
        self.lock = threading.Lock()  # one model call at a time: requests run on a thread pool

    def info(self) -> dict:
        return {"model": self.model_name, "images": len(self.index.paths), "towers": self.towers,
                "max_query_chars": self.settings.max_query_chars, "max_upload_bytes": self.settings.max_upload_bytes,
                "max_labels": self.settings.max_labels}

    # -- checks -------------------------------------------------------------------------------
    def _tower(self, tower: str) -> str:
        if tower not in self.towers:
            raise BadRequest(400, f"tower must be one of {self.towers}, got {tower[:40]!r}")
        return tower

    def _top_k(self, k: str) -> int:
        try:
            value = int(k)
        except ValueError:
            raise BadRequest(400, f"k must be a whole number, got {k[:20]!r}") from None
        if not 1 <= value <= self.settings.max_top_k:
            raise BadRequest(400, f"k must be between 1 and {self.settings.max_top_k}, got {value}")
        return value

    def _query(self, text: str) -> str:
        if not text.strip():
            raise BadRequest(400, "the query is empty")
        if len(text) > self.settings.max_query_chars:
            raise BadRequest(413, f"the query is {len(text)} characters; at most {self.settings.max_query_chars}")
        return text

    def _labels(self, text: str) -> list[str]:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
        if len(labels) > self.settings.max_labels:
            raise BadRequest(413, f"{len(labels)} labels; at most {self.settings.max_labels}")
        long = [label for label in labels if len(label) > self.settings.max_label_chars]
        if long:
            raise BadRequest(413, f"a label is {len(long[0])} characters; at most {self.settings.max_label_chars}")
        return labels

    # -- the model ----------------------------------------------------------------------------
    def encode_texts(self, texts: list[str], tower: str) -> torch.Tensor:
        if tower == "clip":
            return self.model.encode_text_clip(texts).float().cpu()
        return self.model.encode_text(texts).float().cpu()

    def _shown(self, hits: list[Hit]) -> list[dict]:
        return [{"path": display_path(h.path), "url": self.image_url(h.path), "score": round(h.score, 6)}
                for h in hits]

    def image_url(self, path: str) -> str:
        return "/images/" + quote(Path(path).as_posix().encode("utf-8", "surrogateescape"))

    def text_search(self, q: str, k: str, tower: str) -> dict:
        query, top_k, tower = self._query(q), self._top_k(k), self._tower(tower)
        with self.lock:
            return {"query": query, "tower": tower, "hits": self._text_hits(query, top_k, tower)}

    def _text_hits(self, query: str, top_k: int, tower: str) -> list[dict]:
        if tower == "llm":  # the very function `proalign search` uses, so the two always agree
            return self._shown(search(self.model, self.index, [query], top_k)[0])
        scores = (self.encode_texts([query], tower) @ self.index.embeddings.T)[0]
        return self._shown(top_hits(self.index, scores, top_k))

    def image_search(self, data: bytes, k: str, tower: str, labels: str) -> dict:
        from ..data.images import open_rgb
        top_k, wanted = self._top_k(k), self._labels(labels)
        if wanted:
            tower = self._tower(tower)
        try:
            image = open_rgb(bytes(data), "the upload")
            tensor = self.model.image_tensor(image)
        except Exception as err:  # whatever a decoder raises: the upload is not a usable image
            raise BadRequest(400, f"the upload is not a readable image ({type(err).__name__}: {str(err)[:200]})")
        with self.lock:
            return self._image_hits(tensor, top_k, tower, wanted)

    def _image_hits(self, tensor: torch.Tensor, top_k: int, tower: str, wanted: list[str]) -> dict:
        feature = self.model.encode_image(tensor).float().cpu()
        result = {"neighbours": self._shown(top_hits(self.index, self.index.embeddings @ feature, top_k)), "labels": []}
        if wanted:
            text = self.encode_texts(wanted, tower)
            cosine = text @ feature
            scale = _logit_scale(self.model)
            probability = torch.softmax(cosine * scale, dim=0)
            order = cosine.argsort(descending=True).tolist()
            result["labels"] = [{"label": wanted[i], "score": round(float(cosine[i]), 6),
                                 "probability": round(float(probability[i]), 6)} for i in order]
            result["tower"] = tower
        return result

    def image_file(self, path: str) -> Optional[Path]:
        """The file of an indexed image, or None (not indexed, or resolving outside the folder)."""
        if path not in self.paths:
            return None
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target


def _logit_scale(model) -> float:
    scale = getattr(model.clip, "logit_scale", None)
    value = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
    return value if math.isfinite(value) else 100.0


def create_app(service: SearchService):
    """The FastAPI app over a `SearchService`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="proalign", docs_url=None, redoc_url=None, openapi_url=None)
    headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                          "base-uri 'none'; frame-ancestors 'none'",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors())
        return error(400, problems or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server's log")

    @app.middleware("http")
    async def secure_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in headers.items():
            response.headers.setdefault(key, value)
        return response

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    def static(name: str):
        files = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
        if name not in files:
            raise BadRequest(404, "no such file")
        return FileResponse(STATIC / name, media_type=files[name])

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/search")
    def text_search(q: str = "", k: str = "5", tower: str = "llm"):
        return service.text_search(q, k, tower)

    @app.post("/api/image")
    async def image_search(request: Request, k: str = "5", tower: str = "llm", labels: str = ""):
        cap = service.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise BadRequest(413, f"the upload is {int(declared)} bytes; at most {cap}")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a missing or false length is no way round
            body.extend(chunk)
            if len(body) > cap:
                raise BadRequest(413, f"the upload is over {cap} bytes")
        if not body:
            raise BadRequest(400, "the upload is empty: send the image's bytes as the request body")
        return service.image_search(bytes(body), k, tower, labels)

    @app.get("/images/{path:path}")
    def image(path: str):
        target = service.image_file(path)
        if target is None:
            raise BadRequest(404, "no such image in the index")
        return FileResponse(target)

    return app


def run_serve(model_path: str, images: str, host: str = "127.0.0.1", port: int = 7860,
              index_path: Optional[str] = None, device: Optional[str] = None, batch_size: int = 64,
              settings: Optional[ServeSettings] = None, progress: bool = True) -> None:
    """Load the model, index the folder (reusing `proalign search`'s index), serve until stopped."""
    import importlib.util
    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise ProalignError("proalign serve needs FastAPI and uvicorn: pip install 'proalign[serve]'")
    import uvicorn
    from ..loading import load
    if not Path(images).is_dir():  # before the model loads
        raise ProalignError(f"{images}: not a folder of images")
    model, _, _ = load(model_path, device)
    index, counts = index_folder(model, images, index_path, batch_size, progress)
    service = SearchService(model, index, settings or ServeSettings(), str(model_path))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s: anyone who can reach this address can query the model and see "
                    "the indexed images", host)
    print(f"serving {counts['images']} images with {model_path} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
