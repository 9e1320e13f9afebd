"""data.py: the symbolic executor, program helpers, the loader, clear errors, and `python data.py` forwarding
to prepare.py."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
import mini_clevr


# -- the symbolic executor ---------------------------------------------------------------------------

def test_ill_posed_unique_is_rejected():
    scene = {"objects": [dict(shape="cube", color="red", size="large", material="rubber")] * 2,
             "relationships": {r: [[], []] for r in data.RELATIONS}}
    program = [{"function": "scene", "inputs": []}, {"function": "unique", "inputs": [0]},
               {"function": "query_color", "inputs": [1]}]
    with pytest.raises(data.IllPosed):
        data.execute(program, scene)


# -- programs ---------------------------------------------------------------------------------------

def test_program_round_trips(tiny_clevr, clevr_json):
    for q in clevr_json(tiny_clevr, "train", "questions"):
        program = q["program"]
        prefix = data.list_to_prefix(program)
        assert data.prefix_to_list(prefix) == [data.normalize_node(n) for n in program]
        assert data.tree_to_prefix(data.prefix_to_tree(prefix)) == prefix
        assert prefix[0] == data.node_token(program[-1])  # the root is the last node
        heights = data.node_heights(prefix)
        assert heights[0] == max(heights)
        assert all(h == 0 for t, h in zip(prefix, heights) if data.arity(t) == 0)


def test_heights_and_arity():
    prefix = ["equal_color", "query_color", "unique", "filter_shape[cube]", "scene",
              "query_color", "unique", "scene"]
    assert data.node_heights(prefix) == [4, 3, 2, 1, 0, 2, 1, 0]
    assert [data.arity(t) for t in prefix] == [2, 1, 1, 1, 0, 1, 1, 0]
    with pytest.raises(data.DataError):
        data.prefix_to_tree(prefix[:-1])


def test_both_node_spellings_give_the_same_tokens():
    release = {"function": "filter_color", "inputs": [0], "value_inputs": ["red"]}
    generator = {"type": "filter_color", "inputs": [0], "side_inputs": ["red"]}
    assert data.node_token(release) == data.node_token(generator) == "filter_color[red]"


# -- the loader ----------------------------------------------------------------------------------

def test_questions_are_aligned_with_their_images(tiny_clevr, clevr_json):
    """Re-draw each question's scene from the scenes JSON: it must be the image in its batch."""
    scenes = clevr_json(tiny_clevr, "val", "scenes")
    questions = clevr_json(tiny_clevr, "val", "questions")
    with h5py.File(tiny_clevr / "prepared" / "val_questions.h5") as f:
        orig = f["orig_idxs"][:]
    for batch in data.make_loader(tiny_clevr / "prepared", "val", 7, shuffle=False):
        for img, idx in zip(batch["image"], batch["image_index"]):
            drawn = torch.from_numpy(mini_clevr.render(scenes[int(idx)])).permute(2, 0, 1).float() / 255
            assert torch.allclose(img, drawn, atol=1 / 255 + 1e-6)
    assert [questions[i]["image_index"] for i in orig] == [q["image_index"] for q in questions]


def test_loader_shuffles_by_seed_and_epoch_and_val_keeps_everything(tiny_clevr):
    d = tiny_clevr / "prepared"
    n = len(data.Split(d, "train"))
    train = data.make_loader(d, "train", 16, shuffle=True, seed=0, drop_last=True)

    def order(loader, epoch, start=0):
        loader.set_epoch(epoch, start)
        return [tuple(b["question"][:, 1:4].flatten().tolist()) for b in loader]
    assert order(train, 0) == order(train, 0)
    assert order(train, 0) != order(train, 1)
    assert order(train, 1, start=3) == order(train, 1)[3:]
    assert len(train) == n // 16
    val = data.make_loader(d, "val", 7, shuffle=False)
    seen = torch.cat([b["image_index"] for b in val])
    assert len(seen) == len(data.Split(d, "val"))  # val never drops the last partial batch
    big = data.make_loader(d, "val", 10_000, shuffle=True, drop_last=True)  # smaller than one batch
    assert len(big) == 1 and len(next(iter(big))["answer"]) == len(seen)


def test_batch_contract(tiny_clevr):
    batch = next(iter(data.make_loader(tiny_clevr / "prepared", "train", 5, shuffle=True)))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (5, 3, 32, 32)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    for key in ("question", "question_len", "program", "answer", "family", "kind", "image_index"):
        assert batch[key].dtype == torch.long and len(batch[key]) == 5
    L = batch["question"].shape[1]
    assert batch["question_len"].max() == L  # trimmed to the longest question of the batch
    for row, n in zip(batch["question"], batch["question_len"]):
        assert row[0] == data.START and row[n - 1] == data.END and (row[n:] == 0).all()
    assert (batch["program"][:, 0] == data.START).all()


# -- clear errors -----------------------------------------------------------------------------------

def test_missing_data_directory_says_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="no such data directory.*built-in"):
        data.load_info(tmp_path / "nope")
    (tmp_path / "raw" / "questions").mkdir(parents=True)
    with pytest.raises(data.DataError, match="prepare.py clevr"):
        data.load_info(tmp_path / "raw")


def test_feature_file_with_wrong_name_or_shape(tmp_path):
    bad = tmp_path / "train_features.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("feats", data=np.zeros((2, 1024, 14, 14), np.float32))
    with pytest.raises(data.DataError, match="no dataset 'features' or 'data'"):
        data.check_features(bad)
    with h5py.File(bad, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 512, 7, 7), np.float32))
    with pytest.raises(data.DataError, match=r"expected float \(N, 1024, 14, 14\)"):
        data.check_features(bad)
    with h5py.File(bad, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 1024, 14, 14), np.float32))
    with pytest.raises(data.DataError, match="2 feature rows but the questions refer to 5 images"):
        data.check_features(bad, num_images=5)


# -- the old command line ---------------------------------------------------------------------------

def test_python_data_py_prepare_still_works_as_prepare_py_clevr(tiny_clevr, tmp_path):
    """`python data.py prepare` (the old spelling) forwards to `prepare.py clevr`: the same files."""
    out = tmp_path / "prepared"
    run = subprocess.run([sys.executable, "data.py", "prepare", str(tiny_clevr), "--out", str(out), "--size", "32"],
                         cwd=Path(data.__file__).parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"prepared train, val -> {out}" in run.stdout
    for name in ("vocab.json", "info.json", "train_questions.h5", "val_images.h5"):
        assert (out / name).read_bytes() == (tiny_clevr / "prepared" / name).read_bytes(), name


def test_a_checkpoint_runs_on_its_own_data_or_says_where_it_is_missing(tiny_data, tmp_path, monkeypatch):
    """The data a run was trained on, never the built-in data in its place (that would evaluate silently
    on other questions); only the built-in cache itself is made again when it is gone."""
    monkeypatch.setenv("MINI_CLEVR_CACHE", str(tiny_data.parents[1]))  # tiny_data is the built-in data there
    vocab_hash = data.load_info(tiny_data)["vocab_hash"]
    ckpt = lambda saved: {"data_dir": saved, "vocab_hash": vocab_hash}
    assert data.checkpoint_data(ckpt(str(tiny_data)))[0] == data.resolve(tiny_data)
    monkeypatch.chdir(tmp_path)                                # a relative path, read from another folder
    with pytest.raises(data.DataError, match="mini/prepared, which is not there.*--data"):
        data.checkpoint_data(ckpt("mini/prepared"))
    with pytest.raises(data.DataError, match="not there"):
        data.checkpoint_data(ckpt(str(tmp_path / "moved" / "prepared")))
    assert data.checkpoint_data(ckpt("mini/prepared"), tiny_data)[0] == data.resolve(tiny_data)  # --data
