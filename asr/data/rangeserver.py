"""A loopback HTTP server of a folder's files by byte ranges, as OpenSLR's server sends them: to read archives
over HTTP in benchmarks and tests."""

from __future__ import annotations

import functools
import http.server
import multiprocessing
import sys
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A folder's files, a single byte range at a time ("bytes=N-" or "bytes=N-M"), as OpenSLR's server sends them."""

    length: int | None = None  # of the range being sent

    def send_head(self):
        self.length = None
        path = Path(self.translate_path(self.path))
        first, dash, last = self.headers.get("Range", "").removeprefix("bytes=").partition("-")
        if not (dash and first.isdigit() and path.is_file()):
            return super().send_head()
        stat = path.stat()
        start, end = int(first), min(int(last) if last else stat.st_size - 1, stat.st_size - 1)
        source = open(path, "rb")  # closed by the handler, after copyfile
        source.seek(start)
        self.send_response(206)
        self.send_header("ETag", f'"{stat.st_size}-{stat.st_mtime_ns}"')
        self.send_header("Content-Range", f"bytes {start}-{end}/{stat.st_size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.length = end - start + 1
        return source

    def copyfile(self, source, outputfile) -> None:
        left = self.length
        while left is None or left > 0:
            chunk = source.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                return
            outputfile.write(chunk)
            left = None if left is None else left - len(chunk)

    def log_message(self, *args) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that does not print the connections its clients drop."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a reader that seeks elsewhere drops its response
            super().handle_error(request, client_address)


def serve(folder: str, port: multiprocessing.Queue) -> None:
    """Serve ``folder`` on 127.0.0.1 until killed, after putting the port on ``port``."""
    server = QuietServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=folder))
    port.put(server.server_address[1])
    server.serve_forever()
