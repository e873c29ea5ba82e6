"""Files over HTTP read by byte ranges: retries from where a response stopped, and ranges checked."""

import io
import urllib.error

import pytest

from asr.data.remote import RangedHttpFile, RangeError
from tests.helpers import FolderHandler


def test_a_dropped_range_is_asked_for_again_from_where_it_stopped(tmp_path, serve, monkeypatch, caplog):
    www, url = serve
    monkeypatch.setattr(RangedHttpFile, "BACKOFF", 0.0)
    data = bytes(range(256)) * 4000
    (www / "a.tar.gz").write_bytes(data)
    raw = RangedHttpFile(f"{url}/a.tar.gz")  # asks for byte 0 to learn the size
    FolderHandler.cuts[:] = [300_000, 10_000]
    with io.BufferedReader(raw, 1 << 16) as f:
        f.seek(5_000)
        assert f.read() == data[5_000:]
    assert FolderHandler.starts == [0, 5_000, 5_000 + 300_000, 5_000 + 300_000 + 10_000]
    assert caplog.text.count("the connection ended at byte") == 2
    raw = RangedHttpFile(f"{url}/a.tar.gz")
    FolderHandler.cuts[:] = [1, 0, 0, 0]
    with pytest.raises(OSError, match=r"a\.tar\.gz: the connection ended at byte 1, after 3 retries"):
        raw.read(10)
        raw.read(10)
    # Server errors and throttling are retried, from the size request on; a client error is not.
    FolderHandler.statuses[:] = [503, 429]
    assert RangedHttpFile(f"{url}/a.tar.gz").read(3) == data[:3]
    assert "HTTP 503" in caplog.text and "HTTP 429" in caplog.text
    FolderHandler.statuses[:] = [403]
    with pytest.raises(urllib.error.HTTPError, match="403"):
        RangedHttpFile(f"{url}/a.tar.gz")
    assert FolderHandler.statuses == []


def test_a_range_from_the_wrong_place_is_an_error(serve, monkeypatch):
    www, url = serve
    (www / "a.tar.gz").write_bytes(bytes(range(256)) * 40)
    monkeypatch.setattr(FolderHandler, "misplaced", True)
    raw = RangedHttpFile(f"{url}/a.tar.gz")  # from byte 0: as asked
    raw.seek(1000)
    with pytest.raises(RangeError, match=r"a\.tar\.gz: asked for bytes from 1000, the server sent bytes 0-10239"):
        raw.read(10)


def test_a_failing_request_is_made_retries_plus_one_times_with_doubling_waits(serve, monkeypatch):
    www, url = serve
    (www / "a.tar.gz").write_bytes(b"0123456789")
    waits = []
    monkeypatch.setattr("asr.data.remote.time.sleep", waits.append)
    retries = RangedHttpFile.RETRIES
    FolderHandler.statuses[:] = [503] * retries  # fails as often as it is retried: the last attempt succeeds
    assert RangedHttpFile(f"{url}/a.tar.gz").read(4) == b"0123"
    assert FolderHandler.statuses == []
    assert waits == [RangedHttpFile.BACKOFF * 2**k for k in range(retries)]
    FolderHandler.statuses[:] = [503] * (retries + 2)  # one failure more than that: an error, asking no further
    with pytest.raises(OSError, match=f"HTTP 503 Service Unavailable at byte 0, after {retries} retries"):
        RangedHttpFile(f"{url}/a.tar.gz")
    assert FolderHandler.statuses == [503]
