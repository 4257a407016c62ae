"""``edgecl serve``: the board's own web page and HTTP API (docs/SERVE.md).

One process: the camera thread (:mod:`.camera`: it owns inference and keeps only the newest
annotated frame), the operations on the classes and the store (:mod:`.service`), and a Starlette
app (:mod:`.app`) served by uvicorn, with the page in ``static/`` (plain HTML, JS and CSS shipped
in the package: no build step, no CDN). :func:`serve` puts them together; torch-free like the
rest of the device.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from typing import Callable, Optional

from edgecl.core.errors import EdgeclError, one_line

from .app import create_app, is_loopback_host
from .camera import Camera
from .service import MAX_IMAGES, MAX_UPLOAD_MB, Service


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only reaches this machine."""
    host = (host or "").strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return is_loopback_host(host)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: any free one), or one line saying why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError as exc:
        raise EdgeclError(f"cannot listen on {host}:{port} ({one_line(exc)}); choose another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(rt, source, open_source: Callable, host: str = "127.0.0.1", port: int = 8080, token: Optional[str] = None,
          k: int = 3, fps: Optional[float] = None,
          max_images: int = MAX_IMAGES, max_upload_mb: int = MAX_UPLOAD_MB, log: Callable = print) -> None:
    """Serve ``rt`` (a :class:`~edgecl.device.runtime.Runtime`) with the camera on ``source``
    (an open :class:`~edgecl.device.sources.Source`; ``open_source()`` opens it again after it is
    lost) until interrupted. Beyond loopback a token is required: one is generated and printed
    when ``token`` is None."""
    import uvicorn

    loopback = is_loopback(host)
    if not loopback and not token:
        token = new_token()
        log(f"--host {host} reaches beyond this machine: state-changing calls need a token; generated one "
            f"(pass --token to choose it)")
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        raise EdgeclError("--token: use at least 8 printable characters without spaces")
    sock = listen(host, port)
    cam = Camera(rt, open_source, source=source, k=k, fps=fps, log=log)
    service = Service(rt, cam, max_images=max_images, max_upload_bytes=max_upload_mb << 20,
                      token_required=token is not None, log=log)
    app = create_app(service, token=token, loopback_only=loopback)
    url = url_of(sock)
    if token is not None:
        log(f"token: {token}  (state-changing calls need the header 'Authorization: Bearer {token}'; "
            f"the page: {url}#token={token})")
    log(f"edgecl serve: {url} (engine {rt.engine_dir}, store {rt.heads.store.path}, generation "
        f"{rt.heads.state.generation}, {len(rt.classes)} classes)")
    cam.start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        cam.stop()
        sock.close()
    log("edgecl serve: stopped")
