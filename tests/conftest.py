"""Fixtures shared by the tests; shared helpers and constants are in tests/helpers.py."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest

from asr.data.demo import DemoCorpusConfig, build_demo_corpus
from asr.data.rangeserver import QuietServer
from asr.data.text import CharTokenizer
from tests.helpers import TINY_HUBERT, FolderHandler


@pytest.fixture(scope="session")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo corpus (about 3 minutes of training audio), built once per test session."""
    root = tmp_path_factory.mktemp("demo")
    build_demo_corpus(root, DemoCorpusConfig(train_hours=0.05, dev_utterances=16, test_utterances=16))
    return root


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tokenizer) -> Path:
    """A random-init HuBERT-CTC saved with save_pretrained, standing in for a hub checkpoint."""
    from transformers import AutoConfig, AutoModelForCTC

    folder = tmp_path_factory.mktemp("tiny-hubert")
    config = AutoConfig.for_model(**{**TINY_HUBERT, "feat_extract_norm": "layer", "do_stable_layer_norm": True})
    AutoModelForCTC.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture
def serve(tmp_path, monkeypatch):
    """Serve a folder on 127.0.0.1 (:class:`~tests.helpers.FolderHandler`); yields it and its URL."""
    folder = tmp_path / "www"
    folder.mkdir()
    monkeypatch.setattr(FolderHandler, "starts", [])
    monkeypatch.setattr(FolderHandler, "cuts", [])
    monkeypatch.setattr(FolderHandler, "statuses", [])
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(FolderHandler, directory=folder))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
