"""Download against a local HTTP server (127.0.0.1) serving archives and LM resources generated here, with Range
support."""

import gzip
import hashlib
import http.server
import random
import tarfile
import threading

import pytest

from asr.config import compose
from asr.data.__main__ import download_lm
from asr.data.download import LM_ARPA, LM_LEXICON, download_split, fetch
from asr.data.librispeech import scan_directory, split_dir
from tests.helpers import write_flac


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    ranges: list[str | None] = []
    cut_after: int | None = None  # bytes sent before the connection is dropped, once
    send_length = True
    honour_ranges = True

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        self.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested and self.honour_ranges else 0
        if start >= len(body):
            self.send_error(416)
            return
        self.send_response(206 if requested and self.honour_ranges else 200)
        if self.send_length:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if RangeHandler.cut_after is not None:
            self.wfile.write(body[start : start + RangeHandler.cut_after])
            RangeHandler.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.files, RangeHandler.ranges, RangeHandler.cut_after = {}, [], None
    RangeHandler.send_length, RangeHandler.honour_ranges = True, True
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def make_archive(tmp_path, split="dev-clean") -> bytes:
    tree = tmp_path / "src"
    chapter = tree / "LibriSpeech" / split / "1272" / "128104"
    write_flac(chapter / "1272-128104-0000.flac", 1.2)
    write_flac(chapter / "1272-128104-0001.flac", 0.8)
    lines = "1272-128104-0000 MISTER QUILTER\n1272-128104-0001 NOR IS IT\n"
    (chapter / "1272-128104.trans.txt").write_text(lines)
    (tree / "LibriSpeech" / "SPEAKERS.TXT").write_text("1272 | M | dev-clean | 20.0 | John Rose\n")
    archive = tmp_path / f"{split}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "LibriSpeech", arcname="LibriSpeech")
    return archive.read_bytes()


def test_download_resumes_checks_md5_and_extracts(server, tmp_path):
    body = make_archive(tmp_path)
    RangeHandler.files["/dev-clean.tar.gz"] = body
    root = tmp_path / "data"
    root.mkdir()
    (root / "dev-clean.tar.gz.part").write_bytes(body[:1000])  # an interrupted earlier download
    md5 = {"dev-clean": hashlib.md5(body).hexdigest()}

    download_split("dev-clean", root, base_url=server, md5=md5)

    assert RangeHandler.ranges == ["bytes=1000-"]
    assert (root / "dev-clean.tar.gz").read_bytes() == body
    utterances, problems = scan_directory(split_dir(root, "dev-clean"))
    assert [(u.id, u.transcript) for u in utterances] == [
        ("1272-128104-0000", "MISTER QUILTER"),
        ("1272-128104-0001", "NOR IS IT"),
    ]
    assert not problems


def test_md5_mismatch_is_an_error_and_removes_the_download(server, tmp_path):
    RangeHandler.files["/x.tar.gz"] = b"not the published archive"
    target = tmp_path / "x.tar.gz"
    with pytest.raises(RuntimeError, match="does not match the published"):
        fetch(f"{server}/x.tar.gz", target, "0" * 32)
    assert not target.exists() and not target.with_name("x.tar.gz.part").exists()


def test_unreachable_file_names_the_url(server, tmp_path):
    with pytest.raises(RuntimeError, match=r"missing\.tar\.gz: HTTP 404"):
        fetch(f"{server}/missing.tar.gz", tmp_path / "missing.tar.gz", "0" * 32)


def test_a_dropped_connection_keeps_the_partial_download_for_the_next_run(server, tmp_path):
    body = make_archive(tmp_path)
    RangeHandler.files["/dev-clean.tar.gz"] = body
    RangeHandler.cut_after = 700
    target, md5 = tmp_path / "data" / "dev-clean.tar.gz", hashlib.md5(body).hexdigest()
    with pytest.raises(RuntimeError, match=rf"ended after 700 of {len(body)} bytes.*run again to resume"):
        fetch(f"{server}/dev-clean.tar.gz", target, md5)
    assert target.with_name("dev-clean.tar.gz.part").read_bytes() == body[:700]
    assert fetch(f"{server}/dev-clean.tar.gz", target, md5).read_bytes() == body
    assert RangeHandler.ranges == [None, "bytes=700-"]


def test_a_cut_transfer_without_a_length_is_kept_and_a_complete_corrupt_one_removed(server, tmp_path):
    body = make_archive(tmp_path)
    RangeHandler.files["/dev-clean.tar.gz"] = body
    RangeHandler.cut_after, RangeHandler.send_length = 700, False
    target, md5 = tmp_path / "data" / "dev-clean.tar.gz", hashlib.md5(body).hexdigest()
    part = target.with_name("dev-clean.tar.gz.part")
    with pytest.raises(RuntimeError, match=r"after 700 bytes does not match.*sent no length.*run again to resume"):
        fetch(f"{server}/dev-clean.tar.gz", target, md5)
    assert part.read_bytes() == body[:700]
    assert fetch(f"{server}/dev-clean.tar.gz", target, md5).read_bytes() == body

    RangeHandler.files["/other.tar.gz"] = b"not the published archive"
    target = tmp_path / "data" / "other.tar.gz"
    with pytest.raises(RuntimeError, match="sent no length"):
        fetch(f"{server}/other.tar.gz", target, "0" * 32)
    with pytest.raises(RuntimeError, match="does not match the published 0+; removed"):  # the server answers 416
        fetch(f"{server}/other.tar.gz", target, "0" * 32)
    assert not target.with_name("other.tar.gz.part").exists()
    assert RangeHandler.ranges == [None, "bytes=700-", None, "bytes=25-"]

    # A server that also ignores ranges sends the whole file each time: the second answer is all there is.
    RangeHandler.honour_ranges = False
    with pytest.raises(RuntimeError, match="sent no length"):
        fetch(f"{server}/other.tar.gz", target, "0" * 32)
    with pytest.raises(RuntimeError, match="does not match the published 0+; removed"):
        fetch(f"{server}/other.tar.gz", target, "0" * 32)
    assert not target.with_name("other.tar.gz.part").exists()


def test_an_interrupted_extraction_leaves_no_split_behind(server, tmp_path, monkeypatch):
    body = make_archive(tmp_path)
    RangeHandler.files["/dev-clean.tar.gz"] = body
    root, md5 = tmp_path / "data", {"dev-clean": hashlib.md5(body).hexdigest()}
    extract = tarfile.TarFile.extractall

    def interrupted(tar, path, **kwargs):
        extract(tar, path, members=tar.getmembers()[:4], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_split("dev-clean", root, base_url=server, md5=md5)
    staging = root / "LibriSpeech" / ".dev-clean.extracting"
    assert list(staging.rglob("*")) and not (root / "LibriSpeech" / "dev-clean").exists()

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract)
    download_split("dev-clean", root, base_url=server, md5=md5)  # not taken as extracted: extracts again
    utterances, _ = scan_directory(split_dir(root, "dev-clean"))
    assert len(utterances) == 2 and (root / "LibriSpeech" / "SPEAKERS.TXT").exists()
    assert not staging.exists()


def test_lm_resources_resume_after_a_cut_are_size_checked_and_spelled(server, tmp_path, capsys):
    arpa = gzip.compress(random.Random(0).randbytes(5000))
    pronunciations = b"A  AH0\nA  EY1\nA'S  EY1 Z\nCAF\xc3\x89  K AE0 F EY1\nZOO  Z UW1\n"
    RangeHandler.files = {f"/{LM_ARPA}": arpa, f"/{LM_LEXICON}": pronunciations}
    sizes = {LM_ARPA: len(arpa), LM_LEXICON: len(pronunciations)}
    cfg = compose("train", [f"data.root={tmp_path}"])
    RangeHandler.cut_after = 100
    with pytest.raises(RuntimeError, match=rf"ended after 100 of {len(arpa)} bytes.*run again to resume"):
        download_lm(cfg, base_url=server, sizes=sizes)
    download_lm(cfg, base_url=server, sizes=sizes)
    assert RangeHandler.ranges == [None, "bytes=100-", None]
    assert (tmp_path / "lm" / LM_ARPA).read_bytes() == arpa
    assert (tmp_path / "lm" / LM_LEXICON).read_bytes() == pronunciations
    spelled = tmp_path / "lm" / "librispeech-lexicon-letters.txt"
    assert spelled.read_text().splitlines() == ["A A |", "A'S A ' S |", "ZOO Z O O |"]
    assert f"{spelled}: 3 words (1 with other characters left out)" in capsys.readouterr().out

    download_lm(cfg, base_url=server, sizes=sizes)  # complete: nothing is fetched again
    assert len(RangeHandler.ranges) == 3
    with pytest.raises(SystemExit, match=r"python -m asr\.lm experiment=demo"):
        download_lm(compose("train", ["experiment=demo"]), base_url=server, sizes=sizes)


def test_a_file_of_another_size_than_the_published_one_is_removed(server, tmp_path):
    RangeHandler.files["/lexicon.txt"] = b"not the published lexicon"
    target = tmp_path / "lexicon.txt"
    with pytest.raises(RuntimeError, match=r"size 25 does not match the published size 99; removed"):
        fetch(f"{server}/lexicon.txt", target, expected_size=99)
    assert not target.exists() and not target.with_name("lexicon.txt.part").exists()
    with pytest.raises(ValueError, match="an MD5 sum or a size"):
        fetch(f"{server}/lexicon.txt", target)
