"""Fetching the OpenSLR LibriSpeech archives (resumable, MD5-checked, then extracted under ``root``) and its
language-model resources (resumable, size-checked)."""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import Progress

log = logging.getLogger(__name__)

OPENSLR_URL = "https://www.openslr.org/resources/12"
# MD5 sums as published by OpenSLR (resources/12/md5sum.txt).
MD5 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}
# The LibriSpeech LM resources (OpenSLR 11) used for decoding. OpenSLR publishes no checksums for them: these are the
# sizes that Kaldi's LibriSpeech recipe checks (kaldi-asr/kaldi, egs/librispeech/s5/local/download_lm.sh).
OPENSLR_LM_URL = "https://www.openslr.org/resources/11"
LM_ARPA, LM_LEXICON = "4-gram.arpa.gz", "librispeech-lexicon.txt"
LM_SIZES = {LM_ARPA: 1_355_172_078, LM_LEXICON: 5_627_646}
_CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(path: Path, md5: str | None, size: int | None) -> str | None:
    """How ``path`` differs from the published file (its MD5 sum, or its size where no sum is published)."""
    if md5 is not None:
        actual = md5sum(path)
        return None if actual == md5 else f"MD5 {actual}"
    actual = path.stat().st_size
    return None if actual == size else f"size {actual}"


def fetch(url: str, target: Path, expected_md5: str | None = None, expected_size: int | None = None) -> Path:
    """Download ``url`` to ``target``, resuming a ``.part`` file left by an interrupted run, and check it against
    the published MD5 sum or, for files published without one, the published size."""
    if (expected_md5 is None) == (expected_size is None):
        raise ValueError("fetch checks a download against an MD5 sum or a size: give one of them")
    published = expected_md5 if expected_md5 is not None else f"size {expected_size}"
    if target.exists() and _mismatch(target, expected_md5, expected_size) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code != 416:  # 416: the part file is already complete
            raise RuntimeError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
        response = None
    except urllib.error.URLError as err:
        raise RuntimeError(f"cannot download {url}: {err.reason}") from err
    # Whether the part file is known to hold the whole file; a mismatch then means a corrupt download.
    complete = response is None
    if response is not None:
        with response:
            # A server that ignores the range sends the whole file again: start over. Without a length, what it
            # sends is then all there is to get, complete or not: asking again would not resume.
            ignored = offset and response.status != 206
            offset = 0 if ignored else offset
            length = response.headers.get("Content-Length")
            complete = length is not None or bool(ignored)
            total = offset + int(length or 0)
            try:
                with partial.open("ab" if offset else "wb") as out, Progress() as progress:
                    task = progress.add_task(target.name, total=total or None, completed=offset)
                    while block := response.read(_CHUNK):
                        out.write(block)
                        progress.advance(task, len(block))
            except (OSError, http.client.HTTPException) as err:  # a reset, timed-out or cut chunked transfer
                raise RuntimeError(
                    f"{url}: download interrupted ({err}); {partial} is kept, run again to resume"
                ) from err
        size = partial.stat().st_size
        if size < total:  # the server closed the connection early, which reads as the end of the data
            raise RuntimeError(
                f"{url}: the connection ended after {size} of {total} bytes; {partial} is kept, run again to resume"
            )
    actual = _mismatch(partial, expected_md5, expected_size)
    if actual is not None and not complete:
        # Without a Content-Length an early close looks like the end of the data. The next run asks for the
        # rest: a server with nothing more answers 416, and the part file is then known to be complete.
        raise RuntimeError(
            f"{url}: {actual} after {partial.stat().st_size} bytes does not match the published "
            f"{published}, and the server sent no length, so the transfer may have been cut "
            f"short; {partial} is kept, run again to resume"
        )
    if actual is not None:
        partial.unlink()
        raise RuntimeError(f"{url}: {actual} does not match the published {published}; removed, run again")
    partial.rename(target)
    return target


def download_split(split: str, root: str | Path, base_url: str = OPENSLR_URL, md5: dict[str, str] = MD5) -> Path:
    """Fetch and extract one split into ``root/LibriSpeech/<split>``; the archive is kept in ``root``."""
    if split not in md5:
        raise ValueError(f"unknown LibriSpeech split {split!r}; known: {', '.join(md5)}")
    root = Path(root).expanduser()
    destination = root / "LibriSpeech" / split
    if destination.is_dir():
        log.info("%s already extracted at %s", split, destination)
        return destination
    archive = fetch(f"{base_url}/{split}.tar.gz", root / f"{split}.tar.gz", expected_md5=md5[split])
    # Extracted beside the destination (on its file system) and moved there whole: an interrupted extraction
    # leaves no partial split that a later run would take for a complete one.
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{split}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    log.info("Extracting %s", archive)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    extracted = staging / "LibriSpeech"
    if not (extracted / split).is_dir():
        shutil.rmtree(staging)
        raise RuntimeError(f"{archive} did not contain LibriSpeech/{split}/")
    for item in extracted.iterdir():  # SPEAKERS.TXT and the like; the split itself last, once complete
        if item.name != split and not (destination.parent / item.name).exists():
            item.rename(destination.parent / item.name)
    (extracted / split).rename(destination)
    shutil.rmtree(staging)
    return destination


def fetch_lm(
    directory: str | Path, base_url: str = OPENSLR_LM_URL, sizes: dict[str, int] = LM_SIZES
) -> dict[str, Path]:
    """Fetch the LibriSpeech LM resources into ``directory``: the 4-gram ARPA (gzipped; KenLM reads it as it is)
    and the pronunciation lexicon, whose words a character model's lexicon spells."""
    directory = Path(directory).expanduser()
    return {name: fetch(f"{base_url}/{name}", directory / name, expected_size=size) for name, size in sizes.items()}


def lexicon_words(path: Path) -> list[str]:
    """The words of a pronunciation lexicon (``WORD PHONE PHONE ...`` per line, a line per pronunciation)."""
    with path.open() as f:
        return list(dict.fromkeys(line.split(maxsplit=1)[0] for line in f if line.strip()))
