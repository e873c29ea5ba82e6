"""Files over http(s) read by byte ranges: seekable, so that a gzip index can read an archive in parts, and
resumed from where they stopped after a transient fault."""

from __future__ import annotations

import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


class RangeError(OSError):
    """The server does not serve byte ranges or sent the wrong one, or the file changed: asking again will not help."""


class RangedHttpFile(io.RawIOBase):
    """A file over http(s) that can seek, read with byte-range requests: sequential reads stream one response, and
    a read after a seek elsewhere starts another. A gzip index seeks in it as in a local file. A request that fails
    (a dropped connection, a timeout, HTTP 5xx, 408 or 429) is made again from where reading stopped, ``RETRIES``
    times, so that hours of training over the network survive a transient fault. Every range must come from the
    file first opened: same size, same strong ETag (sent as ``If-Range``), and starting where it was asked to."""

    RETRIES = 3
    BACKOFF = 2.0  # seconds before the first retry, doubled for each next one
    LONGEST_WAIT = 60.0  # the most seconds of a server's Retry-After honoured

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.size, self._position, self._response = url, -1, 0, None
        self._etag: str | None = None
        self._retrying(lambda: self._get(0, 0)).close()  # the size and ETag, and whether ranges are served at all

    def _get(self, start: int, end: int | None = None) -> http.client.HTTPResponse:
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"}
        if self._etag is not None:
            headers["If-Range"] = self._etag
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=60)
        except urllib.error.HTTPError as err:
            if err.code == 416:  # an empty file, say: read it whole instead
                raise RangeError(f"{self.url}: the server refused the range from byte {start} (HTTP 416)") from err
            raise
        sent, _, size = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
        problem = None
        if response.status != 206 or not size.isdigit():
            problem = (
                "the server sent the whole file for a range: it changed since it was opened, or no longer "
                "serves byte ranges"
                if self._etag
                else "the server does not serve byte ranges"
            )
        elif not sent.startswith(f"{start}-"):
            problem = f"asked for bytes from {start}, the server sent bytes {sent}"
        elif self.size >= 0 and int(size) != self.size:
            problem = f"its size changed from {self.size} to {size} bytes while it was read"
        if problem is not None:
            response.close()
            raise RangeError(f"{self.url}: {problem}")
        if self.size < 0:
            self.size = int(size)
            etag = response.headers.get("ETag")
            self._etag = etag if etag and not etag.startswith("W/") else None  # If-Range takes strong ones only
        return response

    def _retrying(self, attempt: Callable[[], T]) -> T:
        for k in range(self.RETRIES + 1):
            delay = self.BACKOFF * 2**k
            try:
                return attempt()
            except RangeError:
                raise
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code not in (408, 429):
                    raise
                failure = f"HTTP {err.code} {err.reason}"
                wait = (err.headers or {}).get("Retry-After", "")
                if wait.isdigit():
                    delay = max(delay, min(float(wait), self.LONGEST_WAIT))
            except (OSError, http.client.HTTPException) as err:  # a reset, a timeout, a cut transfer
                failure = str(err) or type(err).__name__
            self._drop()
            if k < self.RETRIES:
                log.warning("%s: %s at byte %d; asking again in %.0f s", self.url, failure, self._position, delay)
                time.sleep(delay)
        raise OSError(f"{self.url}: {failure} at byte {self._position}, after {self.RETRIES} retries")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = (offset, self._position + offset, self.size + offset)[whence]
        if position != self._position:
            self._drop()
        self._position = position
        return position

    def readinto(self, buffer: memoryview) -> int:
        if self._position >= self.size:
            return 0
        n = self._retrying(lambda: self._read_into(buffer))
        self._position += n
        return n

    def _read_into(self, buffer: memoryview) -> int:
        if self._response is None:
            self._response = self._get(self._position)
        n = self._response.readinto(buffer)
        if n == 0:
            raise ConnectionError("the connection ended")
        return n

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self) -> None:
        self._drop()
        super().close()
