"""The HTTP side of ``edgecl serve``: a Starlette app over :class:`~edgecl.device.serve.service.Service`.

Routes (docs/SERVE.md has a curl example for each)::

    GET  /                      the page (static/index.html, app.js, style.css; no CDN, no build)
    GET  /api/status            engine identity, store generation, classes, camera, prediction, timings
    GET  /api/classes           the classes with their sample counts
    GET  /api/history[?limit=N] every generation of the store, newest first
    GET  /api/stream.mjpg       the annotated live stream (MJPEG; each client gets the newest frame)
    GET  /api/frame.jpg         the newest annotated frame
    GET  /api/store             the store's newest generation as a tar (for edgecl merge)   [token]
    POST /api/enroll            {"name": ..., "frames": N}: from the camera's next N frames   [token]
    POST /api/enroll/images     multipart: name, images (files)                                [token]
    POST /api/rename            {"old": ..., "new": ...}                                       [token]
    POST /api/remove            {"name": ...}                                                  [token]
    POST /api/rollback          {"to": G}                                                      [token]
    POST /api/merge             body: a tar of a store folder                                  [token]

Security (:class:`Guard`, in front of every route): with a token (always when the server listens
beyond the loopback interface) every state-changing call and the store download need the header
``Authorization: Bearer TOKEN`` (a header, not a cookie: a page of another site cannot make the
browser add it); a missing or wrong token is 401 before the request's body is read. On loopback,
requests whose ``Host`` is not a loopback name are refused (403: a DNS-rebinding page cannot reach
the server through its own name). In every mode, a state-changing request
that a browser marks as coming from another site (``Origin`` other than the server's,
``Sec-Fetch-Site: cross-site``) is refused (403), request bodies are bounded (413), and every
response carries a strict Content-Security-Policy. Errors are JSON ``{"error": "one line"}``.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgecl.core.errors import EdgeclError, one_line

from .service import ApiError, Service

STATIC = Path(__file__).resolve().parent / "static"
JSON_LIMIT = 64 << 10  # a JSON body at most
PROTECTED_READS = {"/api/store"}  # reads that need the token too (the store holds what the device learned)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
BOUNDARY = "edgecl-frame"


def is_loopback_host(name: str) -> bool:
    name = (name or "").strip("[]").lower()
    return name in LOOPBACK_NAMES or name.startswith("127.") or name.endswith(".localhost")


def json_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """The ASGI middleware of the security rules (module docstring)."""

    def __init__(self, app, token: str | None, loopback_only: bool, max_body: int):
        self.app, self.token, self.loopback_only, self.max_body = app, token, loopback_only, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.check(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def check(self, scope, headers: dict):
        method, path = scope["method"], scope["path"]
        host = urlsplit("//" + headers.get("host", "")).hostname or ""
        if self.loopback_only and not is_loopback_host(host):
            return json_error(403, f"host {host!r} is not this server's loopback name: the server listens on "
                                   f"loopback only (open it as http://127.0.0.1:PORT/)")
        changes = method not in ("GET", "HEAD", "OPTIONS")
        if changes or path in PROTECTED_READS:
            origin = headers.get("origin")
            if origin is not None and origin != "null" and urlsplit(origin).netloc != headers.get("host", ""):
                return json_error(403, f"cross-site request refused (Origin {origin} is not this server)")
            if headers.get("sec-fetch-site") == "cross-site":
                return json_error(403, "cross-site request refused (Sec-Fetch-Site: cross-site)")
            if self.token is not None:
                auth = headers.get("authorization", "")
                scheme, _, given = auth.partition(" ")
                if scheme.lower() != "bearer" or not given:
                    return json_error(401, "this call needs the token: send the header 'Authorization: Bearer "
                                           "TOKEN' (edgecl serve printed it at start)",
                                      {"WWW-Authenticate": "Bearer"})
                if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                    return json_error(401, "wrong token (the header 'Authorization: Bearer TOKEN' must carry the "
                                           "token edgecl serve printed at start)", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return json_error(400, f"Content-Length {length!r} is not a number")
            if int(length) > self.max_body:
                return json_error(413, f"request body of {int(length)} bytes: at most {self.max_body} "
                                       f"(edgecl serve --max-upload-mb)")
        return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 past ``limit`` bytes (whatever Content-Length said)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes: at most {limit} (edgecl serve --max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    body = await read_body(request, JSON_LIMIT)
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON ({one_line(exc)}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object, e.g. {\"name\": \"mug\", \"frames\": 20}")
    return data


def create_app(service: Service, token: str | None = None, loopback_only: bool = True) -> Starlette:
    """The app (routes in the module docstring). ``token``: what state-changing calls must carry
    (None: none, allowed only when ``loopback_only``)."""
    if token is None and not loopback_only:
        raise EdgeclError("serving beyond the loopback interface needs a token")
    cam = service.camera

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def status(request: Request):
        return JSONResponse(await run_in_threadpool(service.status))

    async def classes(request: Request):
        return JSONResponse(await run_in_threadpool(service.classes))

    async def history(request: Request):
        raw = request.query_params.get("limit")
        try:
            limit = None if raw is None else int(raw)
        except ValueError:
            raise ApiError(400, f"limit {raw!r}: must be an integer") from None
        return JSONResponse(await run_in_threadpool(service.history, limit))

    async def stream(request: Request):
        async def frames():
            cam.watch(+1)
            try:
                last, lost_sent = 0, 0.0
                while True:
                    shot = await cam.next_shot(last, timeout=1.0)
                    if shot is None or shot.jpeg is None:
                        state, _ = cam.camera_state()
                        if shot is None and state == "lost" and time.monotonic() - lost_sent > 2.0:
                            lost_sent = time.monotonic()
                            yield part(cam.lost_jpeg(), last, time.time())
                        if shot is not None:
                            last = shot.seq
                        continue
                    last = shot.seq
                    yield part(shot.jpeg, shot.seq, shot.captured)
            finally:
                cam.watch(-1)

        return StreamingResponse(frames(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def frame(request: Request):
        cam.want_jpeg()
        last = cam.latest.seq if cam.latest is not None else 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            shot = await cam.next_shot(last, timeout=max(0.05, deadline - time.monotonic()))
            if shot is None:
                break
            if shot.jpeg is not None:
                return Response(shot.jpeg, media_type="image/jpeg",
                                headers={"Cache-Control": "no-store", "X-Frame-Seq": str(shot.seq),
                                         "X-Captured-At": f"{shot.captured:.6f}"})
            last = shot.seq
        state, message = cam.camera_state()
        raise ApiError(503, f"no frame from the camera ({state}{': ' + message if message else ''})")

    async def store(request: Request):
        name, data = await run_in_threadpool(service.store_archive)
        return Response(data, media_type="application/x-tar",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def enroll(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(service.enroll_live, body.get("name"), body.get("frames", 20)))

    async def enroll_images(request: Request):
        body = await read_body(request, service.max_upload_bytes)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send the images as multipart/form-data: a field 'name' and files in 'images' "
                                "(curl -F name=mug -F images=@a.jpg ...)")
        try:
            form = await Request(request.scope, replay).form(max_files=service.max_images + 1, max_fields=16,
                                                             max_part_size=service.max_upload_bytes)
        except HTTPException as exc:
            raise ApiError(413 if "Too many" in str(exc.detail) else 400, f"the form cannot be read: {exc.detail}") \
                from None
        try:
            files = []
            for item in form.getlist("images"):
                if isinstance(item, str):
                    raise ApiError(400, "'images' must be files (curl -F images=@photo.jpg)")
                files.append((item.filename or "image", await item.read()))
            name = form.get("name")
            if not isinstance(name, str):
                raise ApiError(400, "the form needs a field 'name' (the class label)")
        finally:
            await form.close()
        return JSONResponse(await run_in_threadpool(service.enroll_images, name, files))

    async def rename(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(service.rename, body.get("old"), body.get("new")))

    async def remove(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(service.remove, body.get("name")))

    async def rollback(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(service.rollback, body.get("to")))

    async def merge(request: Request):
        body = await read_body(request, service.max_upload_bytes)
        return JSONResponse(await run_in_threadpool(service.merge_archive, body))

    async def api_error(request: Request, exc: ApiError):
        return json_error(exc.status, exc.message)

    async def edgecl_error(request: Request, exc: EdgeclError):
        return json_error(400, str(exc))

    async def http_error(request: Request, exc: HTTPException):
        return json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    routes = [
        Route("/", page),
        Route("/api/status", status),
        Route("/api/classes", classes),
        Route("/api/history", history),
        Route("/api/stream.mjpg", stream),
        Route("/api/frame.jpg", frame),
        Route("/api/store", store),
        Route("/api/enroll", enroll, methods=["POST"]),
        Route("/api/enroll/images", enroll_images, methods=["POST"]),
        Route("/api/rename", rename, methods=["POST"]),
        Route("/api/remove", remove, methods=["POST"]),
        Route("/api/rollback", rollback, methods=["POST"]),
        Route("/api/merge", merge, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, EdgeclError: edgecl_error,
                                                       HTTPException: http_error})
    return Guard(app, token, loopback_only, service.max_upload_bytes)


def part(jpeg: bytes, seq: int, captured: float) -> bytes:
    """One part of the MJPEG stream (``X-Frame-Seq`` / ``X-Captured-At``: for latency measurements)."""
    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
            f"X-Frame-Seq: {seq}\r\nX-Captured-At: {captured:.6f}\r\n\r\n").encode()
    return head + jpeg + b"\r\n"
