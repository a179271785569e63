"""`vmloader repo serve`: a repository over HTTP with Range and ETag support.

Good enough for a worker pool on a LAN or a test; a stock web server (nginx,
Apache) behind Squid serves the same directory just as well.
"""
import email.utils
import hashlib
import os
import re
import sys
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .serving import serve_until_signalled

RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
COPY_CHUNK = 1 << 20


def etag_of(path: Path) -> str:
    st = path.stat()
    return '"' + hashlib.sha1(f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()[:20] + '"'


class RepositoryHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()
        etag = etag_of(path)
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        size = path.stat().st_size
        start, end = self._range(size)
        if start is None:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        partial_reply = (start, end) != (0, size - 1) and self.headers.get("Range")
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial_reply else HTTPStatus.OK)
        if partial_reply:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))
        self.end_headers()
        self._copy(path, start, end - start + 1)

    def _range(self, size: int) -> tuple:
        header = self.headers.get("Range")
        match = RANGE.match(header.strip()) if header else None
        if not match:
            return 0, size - 1
        first, last = match.groups()
        if not first:                          # suffix range: the last N bytes
            return max(0, size - int(last or 0)), size - 1
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        return (start, end) if start < size and start <= end else (None, None)

    def _copy(self, path: Path, start: int, length: int) -> None:
        with open(path, "rb") as handle:
            handle.seek(start)
            while length > 0:
                block = handle.read(min(COPY_CHUNK, length))
                if not block:
                    return
                self.wfile.write(block)
                length -= len(block)


def serve(directory: Path, host: str, port: int) -> None:
    handler = partial(RepositoryHandler, directory=os.fspath(directory))
    with ThreadingHTTPServer((host, port), handler) as server:
        banner = f"serving {directory} on http://{host}:{server.server_address[1]}/"
        stopped_by = serve_until_signalled(server, ready=lambda: print(banner, flush=True))
    if stopped_by:
        print(f"vmloader repo serve: stopped by {stopped_by}", file=sys.stderr)
