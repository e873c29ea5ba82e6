"""Every kind of bad input a user's corpus may hold, named: an error under ``data.on_error=raise``, a counted skip
listed by id and file under ``skip``, or a rule with a warning; through ``inspect``, verification and training."""

import csv
import json
import logging
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from asr.data.checks import Checks
from asr.data.librispeech import DataError, scan_directory
from asr.data.manifest import load_manifest, own_place
from asr.data.sources.archive import ArchiveSource
from asr.data.sources.folder import FolderSource
from asr.data.verify import Verifier
from tests.helpers import (
    CHECK_PROBLEMS,
    SOURCE_PROBLEMS,
    TINY_MODEL,
    USABLE,
    Recorder,
    make_archive,
    make_datamodule,
    quiet_trainer,
    run_train,
    truncated_corpus,
    write_corpus,
    write_flac,
)

# The kinds write_corpus lacks: id -> reason (the kept first of a repeated id is usable).
MORE_PROBLEMS = {
    "7-8-0001": "transcript not UTF-8",
    "7-8-0002": "dangling symlink",
    "7-8-0000": "duplicate transcript line",
    "9-10-0000": "duplicate utterance id",
}
MORE_USABLE = {"7-8-0000": "FIRST LINE", "9-10-0000": "IN ITS OWN CHAPTER", "12-13-0000": "BOM", "12-13-0001": "TAB"}
BAD = {**SOURCE_PROBLEMS, **CHECK_PROBLEMS, **MORE_PROBLEMS}  # every bad id but the truncated file's


def write_every_bad_kind(root: Path, split: str = "dev-clean") -> Path:
    """The mini corpus of :func:`write_corpus` (missing, empty and orphan transcripts, an unreadable header, a
    truncated file, 8 kHz, too short, characters outside the vocabulary, a label too long for its clip), and a
    Latin-1 transcript line, a dangling symlink, an id given twice in one transcript file and in two chapters, and a
    transcript file with a byte-order mark, CRLF line ends and a tab."""
    folder = write_corpus(root, split)
    chapter = folder / "7" / "8"
    write_flac(chapter / "7-8-0000.flac", 1.0)
    write_flac(chapter / "7-8-0001.flac", 1.0)
    chapter.joinpath("7-8-0002.flac").symlink_to(chapter / "gone.flac")
    (chapter / "7-8.trans.txt").write_bytes(
        "7-8-0000 FIRST LINE\n7-8-0001 CAFÉ CRÈME\n7-8-0002 A LINK\n7-8-0000 SECOND LINE\n".encode("latin-1")
    )
    for chapter in (folder / "9" / "10", folder / "9" / "11"):  # 9-10-0000 in two chapters
        write_flac(chapter / "9-10-0000.flac", 1.0)
        (chapter / f"9-{chapter.name}.trans.txt").write_text("9-10-0000 IN ITS OWN CHAPTER\n")
    chapter = folder / "12" / "13"
    write_flac(chapter / "12-13-0000.flac", 1.0)
    write_flac(chapter / "12-13-0001.flac", 1.0)
    (chapter / "12-13.trans.txt").write_bytes(b"\xef\xbb\xbf12-13-0000 BOM\r\n12-13-0001\tTAB\r\n")
    return folder


def listed(path: Path) -> dict[str, str]:
    """A skip list's rows: id -> reason."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: row["reason"] for row in csv.DictReader(f, delimiter="\t")}


def one_kind(root: Path, kind: str) -> None:
    """A clean chapter, and one bad kind in it."""
    chapter = root / "LibriSpeech" / "dev-clean" / "7" / "8"
    write_flac(chapter / "7-8-0000.flac", 1.0)
    lines = b"7-8-0000 FIRST LINE\n"
    if kind == "latin-1":
        write_flac(chapter / "7-8-0001.flac", 1.0)
        lines += "7-8-0001 CAFÉ\n".encode("latin-1")
    elif kind == "symlink":
        chapter.joinpath("7-8-0001.flac").symlink_to(chapter / "gone.flac")
        lines += b"7-8-0001 A LINK\n"
    elif kind == "line twice":
        lines += b"7-8-0000 SECOND LINE\n"
    else:  # 7-8-0000 in chapter 7/9 too
        write_flac(chapter.parent / "9" / "7-8-0000.flac", 1.0)
        (chapter.parent / "9" / "7-9.trans.txt").write_text("7-8-0000 ANOTHER CHAPTER\n")
    (chapter / "7-8.trans.txt").write_bytes(lines)


def test_the_scan_names_each_new_kind_and_reads_bom_crlf_and_tabs(tmp_path):
    utterances, problems = scan_directory(write_every_bad_kind(tmp_path))
    found = {p.id: p for p in problems}
    assert {i: p.reason for i, p in found.items() if i in MORE_PROBLEMS and i != "9-10-0000"} == {
        "7-8-0001": "transcript not UTF-8",
        "7-8-0002": "dangling symlink",
        "7-8-0000": "duplicate transcript line",
    }
    assert "line 2 of" in found["7-8-0001"].detail and "byte 0xc9" in found["7-8-0001"].detail
    assert found["7-8-0001"].where.endswith("7-8-0001.flac")
    assert (
        found["7-8-0002"].detail == f"it points to {tmp_path}/LibriSpeech/dev-clean/7/8/gone.flac, which does not exist"
    )
    assert found["7-8-0000"].detail == "line 4 repeats the id of line 1, which is kept"
    texts = {u.id: u.transcript for u in utterances}
    assert {i: texts[i] for i in MORE_USABLE} == MORE_USABLE  # the first line of 7-8-0000; BOM, CRLF and tab read
    assert [u.id for u in utterances].count("9-10-0000") == 2  # one per chapter: the catalog's rule keeps one


def test_an_archive_reads_the_same_transcripts(tmp_path):
    write_every_bad_kind(tmp_path / "src")
    archive = make_archive(tmp_path / "src", "dev-clean", tmp_path / "dev-clean.tar.gz")
    manifest = load_manifest(ArchiveSource(str(tmp_path)), str(archive), tmp_path / "m.json")
    texts = {u.id: u.transcript for u in manifest.utterances}
    assert {i: texts[i] for i in MORE_USABLE} == MORE_USABLE
    reasons = {p.id: p.reason for p in manifest.problems}
    assert reasons["7-8-0001"] == "transcript not UTF-8" and reasons["7-8-0000"] == "duplicate transcript line"
    assert reasons["7-8-0002"] == "transcript without audio"  # tar keeps the link as a link: no audio member


def corpus(tmp_path, tokenizer, **options):
    """A DataModule of the corpus in ``tmp_path`` (written first when there is none), dev-clean trained and
    evaluated on."""
    if not (tmp_path / "LibriSpeech").is_dir():
        write_every_bad_kind(tmp_path)
    splits = dict(train_splits=["dev-clean"], val_splits=["dev-clean"], test_splits=[])
    return make_datamodule(tmp_path, tokenizer, batch_size=2, max_batch_seconds=None, **{**splits, **options})


def test_a_repeated_id_keeps_the_first_and_names_both_places(tmp_path, tokenizer):
    dm = corpus(tmp_path, tokenizer)
    dm.prepare_data()
    utterances, problems = dm.catalog.read("dev-clean", for_training=False)
    kept = [u for u in utterances if u.id == "9-10-0000"]
    assert [Path(u.path).parent.name for u in kept] == ["10"]
    (repeated,) = [p for p in problems if p.reason == "duplicate utterance id"]
    assert (
        repeated.where.endswith("9/11/9-10-0000.flac") and f"is also {kept[0].path}, which is kept" in repeated.detail
    )


@pytest.mark.parametrize(
    "kind, message",
    [
        ("latin-1", r"7-8-0001\.flac: transcript not UTF-8 \(line 2 of .*7-8\.trans\.txt is not UTF-8 \(byte 0xc9"),
        ("symlink", r"7-8-0001\.flac: dangling symlink \(it points to .*gone\.flac, which does not exist"),
        ("line twice", r"7-8\.trans\.txt:7-8-0000: duplicate transcript line \(line 2 repeats the id of line 1"),
        ("two chapters", r"7/9/7-8-0000\.flac: duplicate utterance id \(7-8-0000 is also .*7/8/7-8-0000\.flac, which"),
    ],
)
def test_raise_names_the_file_and_the_problem(tmp_path, tokenizer, kind, message):
    one_kind(tmp_path, kind)
    splits = dict(train_splits=["dev-clean"], val_splits=[], test_splits=[])
    dm = make_datamodule(tmp_path, tokenizer, on_error="raise", **splits)
    dm.prepare_data()
    with pytest.raises(DataError, match=message):
        dm.setup("fit")
    skipping = make_datamodule(tmp_path, tokenizer, **splits)
    skipping.prepare_data()
    skipping.setup("fit")
    reason = message.partition(": ")[2].partition(" \\(")[0]
    assert skipping.skipped == {f"dev-clean/{reason}": 1}


def test_a_file_made_readable_or_mended_is_scanned_again(tmp_path):
    folder = write_every_bad_kind(tmp_path)
    source, path = FolderSource(str(tmp_path)), tmp_path / "m.json"
    before = source.fingerprint(str(folder))
    flac = folder / "84" / "121123" / "84-121123-0000.flac"
    mode = flac.stat().st_mode
    flac.chmod(0)
    unreadable = source.fingerprint(str(folder))
    flac.chmod(mode)  # readable again: the same files as first
    assert len({before, unreadable}) == 2 and source.fingerprint(str(folder)) == before
    assert {p.id for p in load_manifest(source, str(folder), path).problems} >= {"7-8-0002"}
    (folder / "7" / "8" / "gone.flac").write_bytes(flac.read_bytes())  # the link mended
    assert "7-8-0002" in {u.id for u in load_manifest(source, str(folder), path).utterances}


@pytest.mark.parametrize("content", ["[]", '{"version": 4}', '{"version": 4, "indexed": false, "utterances": 3}'])
def test_a_manifest_of_the_wrong_shape_is_scanned_again_with_a_warning(tmp_path, content, caplog):
    folder = str(write_corpus(tmp_path))
    path = tmp_path / "manifests" / "dev-clean.json"
    path.parent.mkdir()
    path.write_text(content)
    manifest = load_manifest(FolderSource(str(tmp_path)), folder, path)
    assert {u.id for u in manifest.utterances} == {*USABLE, *CHECK_PROBLEMS}
    assert f"{path} is not a manifest (" in caplog.text and "its part is scanned again" in caplog.text
    assert json.loads(path.read_text())["source"] == folder


def test_manifests_are_readable_by_the_other_users_of_a_shared_corpus(tmp_path):
    folder = str(write_corpus(tmp_path))
    path = tmp_path / "manifests" / "dev-clean.json"
    load_manifest(FolderSource(str(tmp_path)), folder, path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_manifest_another_user_cannot_read_or_write_is_kept_in_their_own_place(tmp_path, monkeypatch, caplog):
    """Simulated (tests may run as root, who reads everything): reading the shared manifest is refused, and so is
    writing in its folder."""
    monkeypatch.setenv("ASR_CACHE", str(tmp_path / "cache"))
    folder = str(write_corpus(tmp_path))
    source, path = FolderSource(str(tmp_path)), tmp_path / "manifests" / "dev-clean.json"
    load_manifest(source, folder, path)  # the first user's
    read_bytes = Path.read_bytes

    def refused(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refused)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path.parent)
    manifest = load_manifest(source, folder, path)
    own = own_place(path)
    assert own.parent.parent == tmp_path / "cache" / "manifests" and manifest.file == str(own) and own.is_file()
    assert f"Cannot read the manifest {path} (Permission denied)" in caplog.text
    assert f"chmod a+r {path}" in caplog.text and "data.manifest_dir" in caplog.text
    assert f"Cannot write the manifest {path}: it goes to {own}" in caplog.text
    assert load_manifest(source, folder, path, verify=False).file == str(own)  # found there next time
    assert sorted(u.id for u in manifest.utterances) == sorted([*USABLE, *CHECK_PROBLEMS])


def test_verify_finds_truncated_audio_up_front_once_and_again_when_changed(tmp_path, tokenizer, monkeypatch, caplog):
    decoded = []
    decode = Checks.decode
    monkeypatch.setattr(
        Checks, "decode", lambda self, utt, *a, **k: decoded.append(utt.id) or decode(self, utt, *a, **k)
    )
    caplog.set_level(logging.INFO, "asr.data.verify")
    dm = corpus(tmp_path, tokenizer, verify=True)
    dm.prepare_data()
    assert len(decoded) == len(USABLE) + len(CHECK_PROBLEMS) + len(MORE_USABLE) + 1  # 9-10-0000 twice
    utterances, problems = dm.catalog.read("dev-clean", for_training=False)
    truncated = next(p for p in problems if p.id == "174-50561-0002")
    assert truncated.reason == "undecodable audio" and truncated.where.endswith("174-50561-0002.flac")
    assert "174-50561-0002" not in {u.id for u in utterances}
    assert "Verified" in caplog.text and "'undecodable audio': 1" in caplog.text
    (manifest,) = dm.catalog.manifest("dev-clean")
    assert len(manifest.verified) == len(decoded) - 1
    decoded.clear()
    again = corpus(tmp_path, tokenizer, verify=True)
    again.prepare_data()
    again.setup("fit")
    assert decoded == []  # recorded in the manifest: nothing decoded twice
    write_flac(Path(truncated.where), 2.0)  # mended
    again.prepare_data()
    assert decoded == ["174-50561-0002"]  # the part is scanned again, but only the changed file decoded
    truncated_corpus(tmp_path / "strict", good=1, bad=1)
    strict = corpus(tmp_path / "strict", tokenizer, verify=True, on_error="raise")
    strict.prepare_data()
    with pytest.raises(DataError, match=r"5-6-1\.flac: undecodable audio"):
        strict.setup("fit")  # before any batch


def test_verify_decodes_an_archive_through_its_index(tmp_path, tokenizer):
    write_corpus(tmp_path / "src")
    make_archive(tmp_path / "src", "dev-clean", tmp_path / "dev-clean.tar.gz")
    splits = dict(train_splits=["dev-clean"], val_splits=[], test_splits=[])
    dm = make_datamodule(tmp_path, tokenizer, ArchiveSource(str(tmp_path)), verify=True, **splits)
    dm.prepare_data()
    _, problems = dm.catalog.read("dev-clean", for_training=True)
    assert {p.id: p.reason for p in problems}["174-50561-0002"] == "undecodable audio"


def test_verification_in_processes_finds_the_same(tmp_path, tokenizer):
    folder = str(write_every_bad_kind(tmp_path))
    dm = make_datamodule(tmp_path, tokenizer)
    results = []
    for k, workers in enumerate([1, 2]):
        manifest = load_manifest(FolderSource(str(tmp_path)), folder, tmp_path / f"m{k}.json")
        Verifier(dm.checks, FolderSource(str(tmp_path)), workers, parallel_from=1).verify(manifest)
        results.append((sorted(manifest.verified), sorted(p.id for p in manifest.problems)))
    assert results[0] == results[1] and "174-50561-0002" in results[0][1]


def fit(dm, run: Path) -> None:
    quiet_trainer(
        max_epochs=1,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=run,
    ).fit(Recorder(), datamodule=dm)


def test_an_epoch_over_every_bad_kind_names_each_skip_or_stops_at_the_first(tmp_path, tokenizer, caplog):
    """The fast variant of the training run below: setup skips named in the log, with the list in the run folder;
    the truncated file found when its batch is decoded."""
    fit(corpus(tmp_path / "data", tokenizer), tmp_path / "run")
    skip_list = tmp_path / "run" / "skipped.tsv"
    assert f"listed in {skip_list})" in caplog.text
    assert "dangling symlink: 1\n    " in caplog.text and "7-8-0002.flac (it points to" in caplog.text
    assert "train, epoch 0: skipped 1 utterances while decoding" in caplog.text
    expected = {**BAD, "174-50561-0002": "undecodable audio", "174-50561-0006": "label longer than the output frames"}
    assert listed(skip_list) == expected
    with pytest.raises(DataError, match=r"2-3-0000\.flac: audio without transcript \(no line for 2-3-0000 in "):
        fit(corpus(tmp_path / "data", tokenizer, on_error="raise"), tmp_path / "strict")


def inspect(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "asr.data", "inspect", f"data.root={tmp_path}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


ONE_SPLIT = ["data.train_splits=[dev-clean]", "data.val_splits=[]", "data.test_splits=[]"]


def test_inspect_names_every_unusable_utterance_and_lists_them_in_a_file(tmp_path):
    write_every_bad_kind(tmp_path)
    result = inspect(tmp_path, *ONE_SPLIT, "data.verify=true")
    assert result.returncode == 0, result.stderr
    expected = {**BAD, "174-50561-0002": "undecodable audio", "174-50561-0006": "label longer than the output frames"}
    out = result.stdout
    assert all(utt_id in out for utt_id in expected), out  # a few per reason, and here all are few
    assert f"{len(expected)} unusable utterances listed in {tmp_path / 'skipped.tsv'}" in out
    assert listed(tmp_path / "skipped.tsv") == expected
    assert f"verified: {len(USABLE) + len(CHECK_PROBLEMS) + len(MORE_USABLE)} files decoded whole" in out
    assert "Traceback" not in result.stderr


def train(tmp_path, *overrides):
    return run_train(
        "experiment=demo",
        "data/source=folder",
        f"data.root={tmp_path}",
        *(f"data.{key}_splits=[dev-clean]" for key in ("train", "val", "test")),
        "trainer.max_steps=2",
        "trainer.max_time=null",
        "~logger",
        *TINY_MODEL,
        *overrides,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_training_over_every_bad_kind_skips_and_names_each_or_stops_at_the_first(tmp_path):
    write_every_bad_kind(tmp_path)
    result = train(tmp_path, "data.verify=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (skip_list,) = tmp_path.glob("outputs/*/*/skipped.tsv")
    found = listed(skip_list)
    expected = {**BAD, "174-50561-0002": "undecodable audio", "174-50561-0006": "label longer than the output frames"}
    assert found == expected and Counter(found.values())["audio without transcript"] == 2
    assert f"listed in {skip_list})" in result.stdout and "dangling symlink: 1\n    " in result.stdout
    (metrics,) = tmp_path.glob("outputs/*/*/metrics.json")
    assert json.loads(metrics.read_text())["data/skipped"] == len(expected)
    stopped = train(tmp_path, "data.on_error=raise")
    assert stopped.returncode != 0
    assert "2-3-0000.flac: audio without transcript (no line for 2-3-0000 in" in stopped.stderr
