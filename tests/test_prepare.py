"""prepare.py: clevr-iep preprocessing (vocab.json, questions h5 in either program spelling, feature rows
by image_index), the command line, the scene CNN's targets, and clear errors for malformed input."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import data
import mini_clevr
import prepare


# -- preprocessing: a tiny CLEVR-format fixture written here ----------------------------------------

def write_fixture(root, spelling):
    """A two-split CLEVR_v1.0-like folder with feature h5 files; programs in either spelling."""
    def node(fn, inputs, value=None):
        if spelling == "release":
            return {"function": fn, "inputs": inputs, "value_inputs": [value] if value else []}
        return {"type": fn, "inputs": inputs, "side_inputs": [value] if value else []}
    qs = [("How many red things are there?", "1", [node("scene", []), node("filter_color", [0], "red"), node("count", [1])], 1),
          ("Is there a cube?", "yes", [node("scene", []), node("filter_shape", [0], "cube"), node("exist", [1])], 0),
          ("What color is the big sphere?", "blue", [node("scene", []), node("filter_size", [0], "large"),
                                                     node("filter_shape", [1], "sphere"), node("unique", [2]),
                                                     node("query_color", [3])], 2)]
    (root / "questions").mkdir(parents=True)
    for split, n_img in (("train", 3), ("val", 2)):
        questions = [{"question": t, "answer": a, "program": p, "image_index": i % n_img,
                      "question_family_index": k, "question_index": k, "split": split}
                     for k, (t, a, p, i) in enumerate(qs)]
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps({"questions": questions}))
        with h5py.File(root / f"{split}_features.h5", "w") as f:
            f.create_dataset("data", data=np.arange(n_img, dtype=np.float32)[:, None, None, None]
                             * np.ones((n_img, 1024, 14, 14), np.float32))
    test = [{"question": "Is there a sphere; or a cube?", "image_index": 0, "split": "test"}]
    (root / "questions" / "CLEVR_test_questions.json").write_text(json.dumps({"questions": test}))
    with h5py.File(root / "test_features.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((1, 1024, 14, 14), np.float16))



@pytest.mark.parametrize("spelling", ["release", "generator"])
def test_vocab_and_h5_round_trip(tmp_path, spelling):
    write_fixture(tmp_path / "clevr", spelling)
    out = prepare.prepare_clevr(tmp_path / "clevr", tmp_path / "prep", images="features", log=lambda *a: None)
    vocab = json.loads((out / "vocab.json").read_text())
    for key in ("question_token_to_idx", "program_token_to_idx", "answer_token_to_idx"):
        assert {k: vocab[key][k] for k in data.SPECIALS} == data.SPECIALS
    qv = {i: t for t, i in vocab["question_token_to_idx"].items()}
    pv = {i: t for t, i in vocab["program_token_to_idx"].items()}
    with h5py.File(out / "train_questions.h5") as f:
        q, p, ans = f["questions"][:], f["programs"][:], f["answers"][:]
        assert q.dtype == np.int32 and p.dtype == np.int32 and ans.dtype == np.int64
        assert list(f["image_idxs"][:]) == [1, 0, 2] and list(f["orig_idxs"][:]) == [0, 1, 2]
    words = [qv[t] for t in q[2] if t]
    assert words == ["<START>", "what", "color", "is", "the", "big", "sphere", "<END>"]
    tokens = [pv[t] for t in p[2] if t]
    assert tokens == ["<START>", "query_color", "unique", "filter_shape[sphere]", "filter_size[large]", "scene", "<END>"]
    answers = {i: t for t, i in vocab["answer_token_to_idx"].items()}
    assert [answers[a] for a in ans] == ["1", "yes", "blue"]
    with h5py.File(out / "test_questions.h5") as f:  # no answers or programs in the test split
        assert "answers" not in f and "programs" not in f
        words = [qv[t] for t in f["questions"][0] if t]
    assert data.tokenize("Is there a sphere; or a cube?") == ["is", "there", "a", "sphere", ";", "or", "a", "cube"]
    assert words == ["<START>", "is", "there", "a", "sphere", "<UNK>", "<UNK>", "a", "cube", "<END>"]
    batch = next(iter(data.make_loader(out, "test", 8, shuffle=False)))
    assert batch["answer"].tolist() == [-100] and batch["kind"].tolist() == [-1]
    info = data.load_info(out)
    assert info["image_kind"] == "features" and info["image_shape"] == (1024, 14, 14)


def test_feature_rows_follow_image_index(tmp_path):
    write_fixture(tmp_path / "clevr", "release")
    out = prepare.prepare_clevr(tmp_path / "clevr", tmp_path / "prep", images="features", log=lambda *a: None)
    batch = next(iter(data.make_loader(out, "train", 8, shuffle=False)))
    assert batch["image"][:, 0, 0, 0].tolist() == [1.0, 0.0, 2.0]  # feature row i holds the value i
    assert batch["kind"].tolist() == [data.QUESTION_KINDS.index(k) for k in ("Count", "Exist", "Query Attribute")]


# -- the command line and the built-in data's features ---------------------------------------------

def test_cli_generate_tiny(tmp_path, capsys):
    prepare.main(["generate", "--tiny", "--out", str(tmp_path / "g")])
    assert f"--data {tmp_path / 'g'} --preset laptop" in capsys.readouterr().out  # --data alone: paper sizes
    info = data.load_info(tmp_path / "g")  # the generated folder resolves to its prepared/ inside
    assert info["image_kind"] == "features" and info["image_shape"] == (1 + 15 + 2, 4, 4)  # scene-CNN predictions
    with h5py.File(tmp_path / "g" / "prepared" / "train_features.h5") as f:
        feats = torch.from_numpy(f["features"][:].astype("float32"))  # (N, 18, 4, 4)
    obj, attrs = feats[:, 0], feats[:, 1:16].split([2, 8, 2, 3], dim=1)  # size, color, material, shape
    assert ((obj >= 0) & (obj <= 1)).all()
    for probs in attrs:  # each attribute's distribution, scaled by the probability that an object is there
        torch.testing.assert_close(probs.sum(1), obj, atol=2e-3, rtol=0)
    batch = next(iter(data.make_loader(tmp_path / "g", "val", 4, shuffle=False)))
    assert batch["image"].shape == (4, 18, 4, 4)
    # x, y: each cell's centre (-1 to 1), moved towards its object's by at most half a cell (1 / (G - 1)),
    # times the probability that an object is centred there
    centres = torch.linspace(-1, 1, 4)
    moved = (batch["image"][:, -2] - centres).abs(), (batch["image"][:, -1] - centres[:, None]).abs()  # (4, 4, 4)
    for m in moved:
        assert (m <= batch["image"][:, 0] / 3 + 2e-3).all()
    assert (tmp_path / "g" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preparing_again_replaces_the_prepared_folder_whole(tiny_clevr, tmp_path):
    out = tmp_path / "prep"
    shutil.copytree(tiny_clevr / "prepared", out)  # pixels: train_images.h5, val_images.h5
    (out / "notes.txt").write_text("kept")  # not named by info.json: not this module's to delete
    said = []
    prepare.prepare_clevr(tiny_clevr, out, images="scene-cnn", size=32, log=said.append)
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "notes.txt", "train_features.h5", "train_questions.h5",
                                                     "val_features.h5", "val_questions.h5", "vocab.json"]
    assert f"  {out}: the prepared data that was there is replaced" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]  # nothing left beside it
    assert data.load_info(out)["image_shape"] == (18, 4, 4)


def test_cli_generate_passes_max_objects_on(tmp_path, clevr_json):
    prepare.main(["generate", "--tiny", "--out", str(tmp_path / "g"), "--max-objects", "3"])
    for split in ("train", "val"):
        assert {len(s["objects"]) for s in clevr_json(tmp_path / "g", split, "scenes")} == {3}  # 3 to 3 objects


def test_scene_cnn_targets_put_each_object_in_its_cell():
    rng = np.random.default_rng(5)
    scenes = [mini_clevr.sample_scene(rng, i, "train", 48) for i in range(30)]
    t, offsets, _ = prepare._cell_targets(scenes, 6)  # (N, 4, 6, 6): -1 or each attribute's value's index
    for i, scene in enumerate(scenes):
        for o in scene["objects"]:
            gx, gy = int(o["pixel_coords"][0] / 8), int(o["pixel_coords"][1] / 8)
            assert t[i, :, gy, gx].tolist() == [data.ATTRIBUTES[a].index(o[a]) for a in data.ATTR_ORDER]
            fx, fy = offsets[i, :, gy, gx].tolist()  # -1 to 1 across the 8-pixel cell: the object's centre
            assert (8 * (gx + (fx + 1) / 2), 8 * (gy + (fy + 1) / 2)) == pytest.approx(o["pixel_coords"][:2])
        assert (offsets[i][:, t[i, 0] < 0] == 0).all()  # no object, no offset
        assert (t[i, 0] >= 0).sum() <= len(scene["objects"])


# -- clear errors -----------------------------------------------------------------------------------

def test_malformed_questions_json(tmp_path):
    (tmp_path / "questions").mkdir()
    (tmp_path / "questions" / "CLEVR_train_questions.json").write_text("{not json")
    with pytest.raises(data.DataError, match="CLEVR_train_questions.json: not valid JSON"):
        prepare.prepare_clevr(tmp_path, tmp_path / "out", log=lambda *a: None)


def test_reading_pngs_without_pillow_says_how_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL":
            raise ImportError("no PIL")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pil)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "CLEVR_train_000000.png").write_bytes(b"")  # the release's layout, no h5
    with pytest.raises(data.DataError, match="pip install pillow"):
        prepare.prepare_pixels(tmp_path, "train", 1, 32, tmp_path / "train_images.h5", log=print)
