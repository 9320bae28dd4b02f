"""`pomona serve`: a web page and a JSON API for apple photos, on one model loaded once.

  GET  /          the page: drop or choose a photo, see the top-3 varieties and the Grad-CAM overlay
  POST /predict   a photo (multipart field `file`, or the raw image as the body) -> JSON top-3 and probabilities
  POST /explain   a photo -> PNG Grad-CAM overlay (`?class_name=` for another class than the predicted one)
  GET  /health    status, model, classes and engine

Requests are decoded in a small thread pool (one decode per core at a time, large photos decoded reduced) and
classified through a micro-batcher (concurrent requests share one model call); oversized bodies are refused with
413 before they are read, non-images with 415, empty or broken images and thin strips with 422, decompression
bombs (too many pixels, read from the header) with 413.

Untrusted clients: at most `max_concurrency` requests are processed at once and `max_queue` more wait their
turn; past that, or after `queue_timeout` seconds of waiting, the answer is 503 with Retry-After (never a reset
connection). Idle connections do not count: a connection that sends no complete request within
`header_timeout` seconds (silent, or trickling its headers) is closed, an upload that does not arrive within
`body_timeout` seconds gets 408, and past `max_connections` the connection idle longest is closed. /health and
the page are never queued. Training code never imports this module; FastAPI is imported only when an app is
created.
"""


import asyncio
import importlib.resources
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np

from ..config import ServeCommand
from ..core.runtime import release_memory
from ..data.images import BadImageError, load_image
from ..data.preprocessing import create_eval_transform_np
from ..inference.engine import MicroBatcher
from ..inference.loaded import load_run
from ..inference.records import PredictionRecord


class ClassifierService:
    """Everything a request needs, created once: the loaded run (ONNX or PyTorch), the micro-batcher and, for
    Grad-CAM, the PyTorch model behind a lock."""

    def __init__(self, settings: ServeCommand):
        self.settings = settings
        self.run = load_run(settings.run, device="cpu", engine=settings.engine, tta=settings.tta,
                            threads=settings.threads or None)
        self.classes = self.run.classes
        self.transform = create_eval_transform_np(self.run.preprocessing)
        self.target = self.run.preprocessing.resize_size
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads or os.cpu_count() or 1,
                                              thread_name_prefix="pomona-decode")
        self.batcher = MicroBatcher(self.run.predict_probs, settings.max_batch)
        # One model call at the largest batch now, so that the engine's memory (ONNX Runtime's arena) grows to its
        # working size at startup rather than at the first burst of requests.
        size = self.run.preprocessing.input_size
        self.run.predict_probs(np.zeros((settings.max_batch, 3, size, size), np.float32))
        self.cam_lock = threading.Lock()
        if settings.explain:
            _ = self.run.models  # load the PyTorch model now, not on the first request
        self.started = time.time()

    def decode(self, data: bytes):
        """The upload as an RGB image, decoded reduced when large; BadImageError for anything unusable."""
        return load_image(data, self.settings.max_pixels, self.target, self.settings.max_aspect)

    def prepare(self, data: bytes) -> np.ndarray:
        """The upload as the model's input array."""
        return self.transform(self.decode(data))

    async def in_decode_pool(self, fn, *args):
        """Run `fn(*args)` in the decode pool: at most `decode_threads` decodes at once, the rest wait."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def describe(self) -> dict:
        return {"status": "ok", "model": self.run.info["model"]["name"], "classes": self.classes,
                "engine": self.run.engine_name, "tta": self.run.tta, "members": len(self.run.info["members"]),
                "input_size": self.run.preprocessing.input_size, "explain": self.settings.explain,
                "uptime_s": round(time.time() - self.started, 1)}

    def result(self, probs: np.ndarray, k: int = 3) -> dict:
        """The JSON answer (`PredictionRecord.to_json`, no path) and every class's probability, to 6 digits."""
        record = PredictionRecord.of(probs, self.classes, self.settings.min_confidence)
        return {**record.to_json(k, digits=6),
                "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)}}

    def explain_png(self, image, class_name: str | None = None) -> tuple[bytes, str]:
        from ..reporting.explain import explain_image, overlay_png

        with self.cam_lock:
            explanation = explain_image(self.run, image, class_name)
        return overlay_png(image, explanation, self.run.preprocessing, self.settings.cam_size), explanation.class_name

    def close(self) -> None:
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


class ServerBusy(Exception):
    """No free slot and the queue is full, or the wait ran out: answered with 503 and Retry-After."""


class RequestGate:
    """At most `max_active` requests run at once; up to `max_queue` more wait, first come first served, for at
    most `timeout` seconds. Beyond that `slot()` raises ServerBusy. `on_idle` is called whenever the last
    request leaves."""

    def __init__(self, max_active: int, max_queue: int, timeout: float, on_idle=None):
        self.max_active, self.max_queue, self.timeout, self.on_idle = max(1, max_active), max_queue, timeout, on_idle
        self.active = 0
        self.waiters: deque[asyncio.Future] = deque()

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.waiters

    @asynccontextmanager
    async def slot(self):
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.active < self.max_active and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= self.max_queue:
            raise ServerBusy(f"server busy: {self.active} requests in progress and {len(self.waiters)} waiting")
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        try:
            async with asyncio.timeout(self.timeout):
                await future  # resolved by _release, which hands its slot over
        except BaseException as e:
            if future.done() and not future.cancelled():  # the slot arrived just as the wait ended
                if isinstance(e, TimeoutError):
                    return
                self._release()
            elif future in self.waiters:
                self.waiters.remove(future)
            if isinstance(e, TimeoutError):
                raise ServerBusy(f"server busy: waited {self.timeout:g} s for one of {self.max_active} slots") from e
            raise

    def _release(self) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes to the next waiter; `active` is unchanged
                return
        self.active -= 1
        if self.active == 0 and self.on_idle is not None:
            self.on_idle()


def status_for(error: BadImageError) -> int:
    """HTTP status of an unusable upload: 415 not an image, 413 too many pixels, 422 empty, broken or a thin
    strip (extreme aspect ratio)."""
    message = str(error)
    if message.startswith("not an image"):
        return 415
    if message.startswith("too many pixels"):
        return 413
    return 422


def page_html() -> str:
    return importlib.resources.files("pomona.serving").joinpath("static/index.html").read_text(encoding="utf-8")


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
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    service = ClassifierService(settings)
    trim_pending = False

    def after_burst() -> None:  # the last request left: give freed decode buffers back, once things are quiet
        nonlocal trim_pending
        if not trim_pending:
            trim_pending = True
            asyncio.get_running_loop().call_later(0.5, trim)

    def trim() -> None:
        nonlocal trim_pending
        trim_pending = False
        if gate.idle:
            service.decode_pool.submit(release_memory)

    gate = RequestGate(settings.max_concurrency, settings.max_queue, settings.queue_timeout, after_burst)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="pomona", description="Which apple variety is in the photo?", lifespan=lifespan)
    app.state.service = service
    app.state.gate = gate
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 1e6))

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})

    @app.exception_handler(ServerBusy)
    async def busy(request: Request, exc: ServerBusy):
        return JSONResponse({"detail": f"{exc}; retry after {settings.retry_after} s"}, status_code=503,
                            headers={"Retry-After": str(settings.retry_after)})

    async def read_upload(request: Request) -> bytes:
        """The uploaded bytes: the multipart field `file`, or the raw body."""
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8)
            except UploadTooLarge:
                raise
            except Exception as e:
                raise HTTPException(400, f"cannot read the multipart form: {e}") from e
            try:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise HTTPException(422, "send the photo as the multipart form field 'file'")
                return await upload.read()
            finally:
                await form.close()
        if media_type.startswith("image/") or media_type == "application/octet-stream" or not media_type:
            return await request.body()
        raise HTTPException(415, f"unsupported content type {content_type!r}: send multipart/form-data with "
                                 "the photo in the field 'file', or the raw image bytes")

    async def read_image(request: Request, decode):
        """`decode(upload bytes)` run in the decode pool; HTTPException with a message for anything unusable."""
        try:
            data = await asyncio.wait_for(read_upload(request), settings.body_timeout)
        except TimeoutError:
            raise HTTPException(408, f"upload too slow: not received within {settings.body_timeout:g} s",
                                headers={"Connection": "close"}) from None
        try:
            return await service.in_decode_pool(decode, data)
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
        async with gate.slot():
            x = await read_image(request, service.prepare)
            probs = await asyncio.wrap_future(service.batcher.submit(x))
        return {**service.result(probs), "engine": service.run.engine_name,
                "milliseconds": round((time.perf_counter() - start) * 1000, 1)}

    @app.post("/explain")
    async def explain(request: Request, class_name: str | None = None) -> Response:
        if not settings.explain:
            raise HTTPException(404, "Grad-CAM is switched off (pomona serve --no-explain)")
        if class_name is not None and class_name not in service.classes:
            raise HTTPException(422, f"unknown class {class_name!r}; the model knows {service.classes}")
        async with gate.slot():
            image = await read_image(request, service.decode)
            png, shown = await run_in_threadpool(service.explain_png, image, class_name)
        return Response(png, media_type="image/png", headers={"X-Pomona-Class": shown})

    return app


IDLE_GRACE_S = 1.0
"""Past `max_connections`, only connections idle for longer than this are closed."""


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 HTTP protocol with two guards against idle and slow clients: a connection with no request in
    progress (just opened, or after a response) must complete a request's headers within `header_timeout`
    seconds, however it trickles them, else it is closed; and past `max_connections` open connections, the one
    idle longest (for more than IDLE_GRACE_S) is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        waiting_since = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._follow_request()
            if len(self.connections) > max_connections:  # close the connection idle longest, if any is idle
                since = time.monotonic() - IDLE_GRACE_S  # (a connection of the same burst may not have sent yet)
                idle = [c for c in self.connections
                        if isinstance(c, GuardedH11Protocol) and c.waiting() and c.waiting_since < since]
                if idle:
                    min(idle, key=lambda c: c.waiting_since).transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow_request()

        def on_response_complete(self) -> None:
            self._stop_clock()  # a new wait for the next request starts now
            super().on_response_complete()
            self._follow_request()

        def connection_lost(self, exc) -> None:
            self._stop_clock()
            super().connection_lost(exc)

        def waiting(self) -> bool:
            """No request in the app: the connection waits for (the rest of) a client's request."""
            return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

        def _follow_request(self) -> None:
            if not self.waiting():
                self._stop_clock()
            elif self.header_timer is None:  # started once per wait: trickled bytes do not extend it
                self.waiting_since = time.monotonic()
                self.header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _stop_clock(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _too_slow(self) -> None:
            self.header_timer = None
            if self.waiting():
                self.transport.close()

    return GuardedH11Protocol


def serve(settings: ServeCommand) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(settings)
    print(f"pomona: serving {settings.run} ({app.state.service.run.engine_name} engine) at "
          f"http://{settings.host}:{settings.port}/", flush=True)
    protocol = guarded_protocol(settings.header_timeout, settings.max_connections)
    uvicorn.run(app, host=settings.host, port=settings.port, http=protocol,
                timeout_keep_alive=settings.keep_alive_timeout, log_level="warning")
