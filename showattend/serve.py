"""``showattend serve``: a local web page where a person drops a photo and inspects its attention.

Server library: the standard library's ``http.server.ThreadingHTTPServer``. The page is one
static document plus one JSON endpoint for one local user, so a framework would add a dependency
and nothing we need; the standard library is maintained with Python itself. It is not meant to
face the internet (nor is any tool that runs a model per request on a CPU): it binds 127.0.0.1
unless told otherwise and, while bound to a loopback address, answers only requests addressed to
a loopback name (a web page elsewhere cannot reach it through DNS rebinding).

Uploads: the page sends the file's raw bytes as the request body (``fetch(url, {body: file})``),
so there is no multipart form to parse (the ``cgi`` module that used to parse them is gone from
Python 3.13). The body size is checked against the limit from Content-Length before anything is
read into memory; the bytes go through :func:`showattend.data.images.load_image`, the one image
loader, so a non-image, a truncated file or a decompression bomb is refused with its reason. Any
failure in one request becomes an error message on the page; the server keeps serving. Models are
loaded once, at start; requests are captioned one at a time (a lock) since the model and
``load_image``'s warning capture are not meant for concurrent use.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from showattend.api import CaptionerAPI

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_UPLOAD", "Inspector", "UploadError", "make_server", "serve"]

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes: far above any photo, far below a memory problem
_DRAIN_LIMIT = 256 * 1024 * 1024  # an over-limit body up to this size is read and dropped so the
# browser sees the answer; beyond it the connection is simply closed
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


class UploadError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status, the message is for people."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _human(n: int) -> str:
    return f"{n / 1048576:.1f} MB" if n >= 1048576 else f"{n / 1024:.0f} KB"


KEEP_UPLOADS = 32  # uploads kept decoded for explain requests


def _explain_request(raw: bytes) -> dict[str, str]:
    """{"key": upload, "text": caption} from an explain request's JSON body."""
    try:
        ask = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        ask = None
    if not isinstance(ask, dict) or not isinstance(ask.get("key"), str) or \
            not isinstance(ask.get("text"), str):
        raise UploadError(HTTPStatus.BAD_REQUEST, 'explain takes {"key": …, "text": …}')
    if len(ask["text"]) > 2000:
        raise UploadError(HTTPStatus.BAD_REQUEST, "a caption to explain has at most 2,000 "
                                                  "characters")
    return ask


class Inspector:
    """The models (loaded once) and what the page needs from them."""

    def __init__(self, models: Mapping[str, CaptionerAPI], beam: int | None = None,
                 mode: str | None = None, checkpoints: Mapping[str, str] | None = None,
                 max_upload: int = DEFAULT_MAX_UPLOAD):
        from showattend.report import ModelInfo

        if not models:
            raise ValueError("serve needs at least one model")
        self.models = dict(models)
        self.beam = beam
        self.mode = mode
        self.max_upload = int(max_upload)
        self.infos = [ModelInfo.from_api(n, api, beam or api.config.eval.beam, mode,
                                         (checkpoints or {}).get(n, ""))
                      for n, api in self.models.items()]
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="showattend-serve-")
        self._page: bytes | None = None
        self.served = 0  # images captioned since start
        # the last uploads, decoded, so the page can ask where the models look for a caption
        # a person types (explain): key → (file name, image), the oldest dropped first
        self._images: dict[str, tuple[str, Any]] = {}

    def page(self) -> bytes:
        """The page (the report's page in serve mode, with no images yet), built once."""
        if self._page is None:
            from showattend.report import Report

            title = "showattend: " + ", ".join(i.name for i in self.infos)
            html = Report(self.infos, [], title=title).html(mode="serve",
                                                            max_upload=self.max_upload)
            self._page = html.encode("utf-8")
        return self._page

    def caption_bytes(self, raw: bytes, filename: str) -> dict[str, Any]:
        """Caption an uploaded file with every model; the page's entry for it.

        Raises :class:`UploadError` (415) with a message naming the file when it is no image.
        """
        from showattend.data.images import ImageLoadError, load_image
        from showattend.report import Entry, Report

        name = Path(filename).name or "upload"
        # keep the extension (a few formats are recognised by it); the name itself is ours
        suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(name).suffix)[:10]
        with self._lock:
            fd, tmp = tempfile.mkstemp(dir=self._tmp.name, suffix=suffix)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(raw)
                try:
                    image = load_image(tmp)
                except ImageLoadError as exc:
                    # the message names our temporary file; the person knows the file as name
                    reason = str(exc).split(f"{tmp}: ", 1)[-1].replace(tmp, name)
                    raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                      f"{name} is not an image this server can read: {reason}"
                                      ) from None
                captions = []
                for api in self.models.values():
                    [c] = api.caption([image], beam=self.beam, mode=self.mode, alternatives=True)
                    for x in [c, *c.alternatives]:
                        x.image = name
                    captions.append(c)
            finally:
                Path(tmp).unlink(missing_ok=True)
            self.served += 1
            key = f"u{self.served}"
            self._images[key] = (name, image)
            while len(self._images) > KEEP_UPLOADS:
                self._images.pop(next(iter(self._images)))
            report = Report(self.infos, [Entry(name=name, path=name, captions=captions)])
            return {**report.entry_data(report.entries[0]), "key": key}

    def explain(self, key: str, text: str) -> list[dict[str, Any]]:
        """Each model's explained caption of ``text`` on upload ``key``, in the page's beam
        format. Raises :class:`UploadError` (404: the upload is gone, 400: no word)."""
        from showattend.explain import ExplainError
        from showattend.report.build import beam_record

        with self._lock:
            if key not in self._images:
                raise UploadError(HTTPStatus.NOT_FOUND, "that photo is no longer on the server: "
                                                        "upload it again")
            name, image = self._images[key]
            out = []
            try:
                for api in self.models.values():
                    [c] = api.explain([image], text, mode=self.mode, own_caption=False)
                    c.image = name
                    out.append(beam_record(c))
            except ExplainError as exc:
                raise UploadError(HTTPStatus.BAD_REQUEST, str(exc)) from None
            return out

    def close(self) -> None:
        self._tmp.cleanup()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "showattend"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a stalled client may hold its thread

    # ---- plumbing

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        hostname = urlsplit(f"//{host}").hostname or ""
        return hostname in _LOOPBACK_NAMES or hostname.startswith("127.")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.info("%s %s", self.address_string(), format % args)

    # ---- routes

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._host_allowed():
            self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.inspector.page(), "text/html; charset=utf-8")
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        t0 = time.perf_counter()
        filename = unquote(self.headers.get("X-Filename") or "upload")
        try:
            if not self._host_allowed():
                raise UploadError(HTTPStatus.FORBIDDEN, "unexpected Host header")
            route = urlsplit(self.path).path
            if route not in ("/caption", "/explain"):
                raise UploadError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
            raw = self._read_body(filename)
            if route == "/explain":
                ask = _explain_request(raw)
                beams = self.server.inspector.explain(ask["key"], ask["text"])
                self._json(HTTPStatus.OK, {"beams": beams,
                                           "seconds": round(time.perf_counter() - t0, 3)})
                return
            entry = self.server.inspector.caption_bytes(raw, filename)
        except UploadError as exc:
            self._json(exc.status, {"error": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.error("captioning %s failed:\n%s", filename, traceback.format_exc())
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": f"captioning {filename} failed: {type(exc).__name__}: {exc}"})
            return
        self._json(HTTPStatus.OK, {"image": entry, "seconds": time.perf_counter() - t0})

    def _read_body(self, filename: str) -> bytes:
        limit = self.server.inspector.max_upload
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "send the file with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise UploadError(HTTPStatus.LENGTH_REQUIRED,
                              "send the file with a Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise UploadError(HTTPStatus.BAD_REQUEST, "negative Content-Length")
        if length == 0:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"{filename} is empty")
        if length > limit:
            # Read and drop the body (never keep it) so the browser gets to read our answer;
            # a huge one is not worth the time: close instead.
            self.close_connection = True
            if length <= _DRAIN_LIMIT:
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"{filename} is {_human(length)}: this server takes images up to "
                              f"{_human(limit)}")
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise UploadError(HTTPStatus.BAD_REQUEST,
                              f"{filename}: the upload stopped after {len(raw)} of {length} bytes")
        return raw


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for a stalled client
    inspector: Inspector
    loopback_only: bool


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(inspector: Inspector, host: str = "127.0.0.1", port: int = 8000) -> _Server:
    """A bound server (port 0 picks a free one: read ``server.server_address``); call
    ``serve_forever()`` on it, ``shutdown()`` from another thread to stop it."""
    cls = _Server
    if ":" in host:  # an IPv6 address
        cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = cls((host, port), _Handler)
    server.inspector = inspector
    server.loopback_only = _is_loopback(host)
    return server


def serve(models: Mapping[str, CaptionerAPI], host: str = "127.0.0.1", port: int = 8000,
          beam: int | None = None, mode: str | None = None,
          checkpoints: Mapping[str, str] | None = None, max_upload: int = DEFAULT_MAX_UPLOAD,
          ready=None) -> None:
    """Serve until interrupted. ``ready(url)`` is called once the socket listens."""
    inspector = Inspector(models, beam, mode, checkpoints, max_upload)
    server = make_server(inspector, host, port)
    h, p = server.server_address[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}/"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        inspector.close()
