"""`pomona serve`: a web page and a JSON API for apple photos, on one model loaded once.

  GET  /          the page: drop or choose a photo, see the top-3 varieties and the Grad-CAM overlay
  POST /predict   a photo (multipart field `file`, or the raw image as the body) -> JSON top-3 and probabilities
  POST /explain   a photo -> PNG Grad-CAM overlay (`?class_name=` for another class than the predicted one)
  GET  /health    status, model, classes and engine

Requests are decoded in a thread pool and classified through a micro-batcher (concurrent requests share one
model call); oversized bodies are refused with 413 before they are read, non-images with 415, empty or broken
images with 422, decompression bombs (too many pixels, read from the header) with 413. Training code never
imports this module; FastAPI is imported only when an app is created.
"""


import asyncio
import importlib.resources
import threading
import time

import numpy as np

from .checkpoint import load_run
from .config import ServeCommand
from .engine import MicroBatcher, verdict
from .images import BadImageError, load_image
from .preprocessing import create_eval_transform_np


class ClassifierService:
    """Everything a request needs, created once: the loaded run (ONNX or PyTorch), the micro-batcher and, for
    Grad-CAM, the PyTorch model behind a lock."""

    def __init__(self, settings: ServeCommand):
        self.settings = settings
        self.run = load_run(settings.run, device="cpu", engine=settings.engine, tta=settings.tta,
                            threads=settings.threads or None)
        self.classes = self.run.classes
        self.transform = create_eval_transform_np(self.run.preprocessing)
        self.batcher = MicroBatcher(self.run.predict_probs, settings.max_batch)
        self.cam_lock = threading.Lock()
        if settings.explain:
            _ = self.run.models  # load the PyTorch model now, not on the first request
        self.started = time.time()

    def decode(self, data: bytes):
        return load_image(data, self.settings.max_pixels)

    def describe(self) -> dict:
        return {"status": "ok", "model": self.run.info["model"]["name"], "classes": self.classes,
                "engine": self.run.engine_name, "tta": self.run.tta, "members": len(self.run.info["members"]),
                "input_size": self.run.preprocessing.input_size, "explain": self.settings.explain,
                "uptime_s": round(time.time() - self.started, 1)}

    def result(self, probs: np.ndarray, k: int = 3) -> dict:
        order = np.argsort(-probs)
        top = [{"label": self.classes[i], "probability": round(float(probs[i]), 6)} for i in order[:k]]
        said = verdict(probs, self.classes, self.settings.min_confidence)
        return {"label": top[0]["label"], "probability": top[0]["probability"],
                "sure": not said.startswith("not sure"), "verdict": said, "top": top,
                "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)}}

    def explain_png(self, image, class_name: str | None = None) -> tuple[bytes, str]:
        from .explain import explain_image, overlay_png

        with self.cam_lock:
            explanation = explain_image(self.run, image, class_name)
        return overlay_png(image, explanation, self.run.preprocessing, self.settings.cam_size), explanation.class_name

    def close(self) -> None:
        self.batcher.close()


def status_for(error: BadImageError) -> int:
    """HTTP status of an unusable upload: 415 not an image, 413 too many pixels, 422 empty or broken."""
    message = str(error)
    if message.startswith("not an image"):
        return 415
    if message.startswith("too many pixels"):
        return 413
    return 422


def page_html() -> str:
    return importlib.resources.files("pomona").joinpath("static/index.html").read_text(encoding="utf-8")


class BodyLimit:
    """ASGI middleware refusing request bodies over `max_bytes` with 413: at once when Content-Length says so,
    else as soon as the streamed body passes the limit (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self.message(int(length))}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.message(received, streamed=True))
            return message

        await self.app(scope, limited_receive, send)

    def message(self, size: int, streamed: bool = False) -> str:
        what = f"more than {size} bytes" if streamed else f"{size} bytes"
        return f"upload too large: {what}, the limit is {self.max_bytes} bytes ({self.max_bytes / 1e6:.1f} MB)"


class UploadTooLarge(Exception):
    """Raised from inside the request stream when the body passes the limit; answered with 413."""


def create_app(settings: ServeCommand):
    """The FastAPI app serving the run folder `settings.run`; the model is loaded here, once."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    service = ClassifierService(settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="pomona", description="Which apple variety is in the photo?", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 1e6))

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})

    async def read_image(request: Request):
        """The uploaded photo, decoded; HTTPException with a message for anything unusable."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=8)
            except UploadTooLarge:
                raise
            except Exception as e:
                raise HTTPException(400, f"cannot read the multipart form: {e}") from e
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "send the photo as the multipart form field 'file'")
            data = await upload.read()
        elif content_type.startswith(("image/", "application/octet-stream")) or not content_type:
            data = await request.body()
        else:
            raise HTTPException(415, f"unsupported content type {content_type!r}: send multipart/form-data with "
                                     "the photo in the field 'file', or the raw image bytes")
        try:
            return await run_in_threadpool(service.decode, data)
        except BadImageError as e:
            raise HTTPException(status_for(e), f"unusable image: {e}") from e

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page_html()

    @app.get("/health")
    async def health() -> dict:
        return service.describe()

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        start = time.perf_counter()
        image = await read_image(request)
        x = await run_in_threadpool(service.transform, image)
        probs = await asyncio.wrap_future(service.batcher.submit(x))
        return {**service.result(probs), "engine": service.run.engine_name,
                "milliseconds": round((time.perf_counter() - start) * 1000, 1)}

    @app.post("/explain")
    async def explain(request: Request, class_name: str | None = None) -> Response:
        if not settings.explain:
            raise HTTPException(404, "Grad-CAM is switched off (pomona serve --no-explain)")
        if class_name is not None and class_name not in service.classes:
            raise HTTPException(422, f"unknown class {class_name!r}; the model knows {service.classes}")
        image = await read_image(request)
        png, shown = await run_in_threadpool(service.explain_png, image, class_name)
        return Response(png, media_type="image/png", headers={"X-Pomona-Class": shown})

    return app


def serve(settings: ServeCommand) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(settings)
    print(f"pomona: serving {settings.run} ({app.state.service.run.engine_name} engine) at "
          f"http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, limit_concurrency=settings.max_concurrency,
                log_level="warning")
