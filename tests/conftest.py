"""Shared test fixtures: the repository on sys.path, and the tiny built-in mini-CLEVR made once per session
(prepared as train.py uses it, and in CLEVR's layout with its pixels)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and on a shared machine a busy core makes
# OpenMP threads spin: a tiny MAC step has taken far longer on two threads than on one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The prepared tiny built-in mini-CLEVR, generated into a temporary cache ($MINI_CLEVR_CACHE)."""
    import data
    cache = tmp_path_factory.mktemp("mini-clevr-cache")
    old = os.environ.get("MINI_CLEVR_CACHE")
    os.environ["MINI_CLEVR_CACHE"] = str(cache)
    try:
        return data.ensure_builtin(tiny=True, log=lambda *a, **k: None)
    finally:
        if old is None:
            del os.environ["MINI_CLEVR_CACHE"]
        else:
            os.environ["MINI_CLEVR_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_clevr(tmp_path_factory):
    """The tiny built-in mini-CLEVR in CLEVR's layout (questions/, scenes/, images/), with prepared/
    holding its pixels (32 x 32) rather than scene-CNN features."""
    import mini_clevr
    import prepare
    out = tmp_path_factory.mktemp("tiny")
    mini_clevr.generate(out, tiny=True, log=lambda *a: None)
    prepare.prepare_clevr(out, out / "prepared", size=32, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def clevr_json():
    """read(folder, split, what): the list `what` ('questions' or 'scenes') of a CLEVR-layout folder's split."""
    def read(folder, split, what):
        return json.loads((folder / what / f"CLEVR_{split}_{what}.json").read_text())[what]
    return read
