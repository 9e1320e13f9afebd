"""data.py: the generator's invariants, program helpers, clevr-iep preprocessing and the loader."""
import json

import h5py
import numpy as np
import pytest
import torch

import data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny built-in dataset, generated once for this module (raw CLEVR layout + prepared/)."""
    out = tmp_path_factory.mktemp("tiny")
    data.generate(out, tiny=True, log=lambda *a: None)
    data.prepare(out, out / "prepared", size=32, log=lambda *a: None)
    return out


def load(out, split, what):
    return json.loads((out / what / f"CLEVR_{split}_{what}.json").read_text())[what]


# -- the generator --------------------------------------------------------------------------------

def test_generator_is_deterministic(tmp_path, tiny):
    data.generate(tmp_path, tiny=True, log=lambda *a: None)
    for split in ("train", "val"):
        for what in ("questions", "scenes"):
            assert (tmp_path / what / f"CLEVR_{split}_{what}.json").read_bytes() == \
                   (tiny / what / f"CLEVR_{split}_{what}.json").read_bytes()
        with h5py.File(tmp_path / "images" / f"{split}.h5") as a, h5py.File(tiny / "images" / f"{split}.h5") as b:
            assert np.array_equal(a["images"][:], b["images"][:])
    other = tmp_path / "seed1"
    data.generate(other, tiny=True, seed=1, log=lambda *a: None)
    assert load(other, "train", "questions") != load(tiny, "train", "questions")


def test_every_answer_is_the_executors_answer(tiny):
    for split in ("train", "val"):
        scenes = load(tiny, split, "scenes")
        for q in load(tiny, split, "questions"):
            assert data.execute(q["program"], scenes[q["image_index"]]) == q["answer"]


def test_questions_are_well_posed_and_cover_every_kind_and_function():
    rng = np.random.default_rng(0)
    _, questions = data.generate_split(rng, "train", 120, 10, 64)
    kinds, functions = set(), set()
    for q in questions:
        functions |= {n["function"] for n in q["program"]}
        kinds.add(data.question_kind(q["program"][-1]["function"]))
        uniques = [n for n in q["program"] if n["function"] == "unique"]
        assert all(n["inputs"] for n in uniques)
    assert kinds == set(data.QUESTION_KINDS)
    expected = {"scene", "unique", "relate", "union", "intersect", "count", "exist", "less_than",
                "greater_than", "equal_integer"} | {f"{p}_{a}" for a in data.ATTR_ORDER
                                                    for p in ("filter", "query", "equal")} | {"same_color", "same_shape", "same_size", "same_material"}
    assert expected <= functions
    hops = {sum(n["function"] == "relate" for n in q["program"]) for q in questions}
    assert {1, 2} <= hops


def test_ill_posed_unique_is_rejected():
    scene = {"objects": [dict(shape="cube", color="red", size="large", material="rubber")] * 2,
             "relationships": {r: [[], []] for r in data.RELATIONS}}
    program = [{"function": "scene", "inputs": []}, {"function": "unique", "inputs": [0]},
               {"function": "query_color", "inputs": [1]}]
    with pytest.raises(data.IllPosed):
        data.execute(program, scene)


def test_relations_agree_with_the_picture(tiny):
    for scene in load(tiny, "train", "scenes"):
        xy = [o["pixel_coords"][:2] for o in scene["objects"]]
        for i, (x, y) in enumerate(xy):
            rel = scene["relationships"]
            assert set(rel["left"][i]) == {j for j, (x2, _) in enumerate(xy) if x2 < x}
            assert set(rel["right"][i]) == {j for j, (x2, _) in enumerate(xy) if x2 > x}
            assert set(rel["behind"][i]) == {j for j, (_, y2) in enumerate(xy) if y2 < y}  # higher up
            assert set(rel["front"][i]) == {j for j, (_, y2) in enumerate(xy) if y2 > y}


def test_objects_are_drawn_where_the_scene_says_in_their_color():
    rng = np.random.default_rng(3)
    for k in range(20):
        scene = data.sample_scene(rng, k, "train", 64)
        img = data.render(scene).astype(int)
        for o in scene["objects"]:
            x, y = (int(v) for v in o["pixel_coords"][:2])
            rgb = np.array(data.RGB[o["color"]])
            if o["material"] == "rubber":  # matte: the centre pixel is close to the object's colour
                assert np.abs(img[y, x] - rgb).max() < 40, (o, img[y, x])
            else:  # metal: darker body, and a highlight much brighter than the body
                patch = img[y - 3:y + 1, x - 3:x + 1].sum(-1)
                assert patch.max() > img[y + 2, x + 2].sum() + 60, o


def test_majority_per_family_baseline_needs_the_image():
    train = data.generate_split(np.random.default_rng([0, 0]), "train", 400, 10, 64)[1]
    val = data.generate_split(np.random.default_rng([0, 1]), "val", 150, 10, 64)[1]
    assert data.majority_baseline(train, val) <= 0.45


# -- programs ---------------------------------------------------------------------------------------

def test_program_round_trips(tiny):
    for q in load(tiny, "train", "questions"):
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
    out = data.prepare(tmp_path / "clevr", tmp_path / "prep", images="features", log=lambda *a: None)
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
    out = data.prepare(tmp_path / "clevr", tmp_path / "prep", images="features", log=lambda *a: None)
    batch = next(iter(data.make_loader(out, "train", 8, shuffle=False)))
    assert batch["image"][:, 0, 0, 0].tolist() == [1.0, 0.0, 2.0]  # feature row i holds the value i
    assert batch["kind"].tolist() == [data.QUESTION_KINDS.index(k) for k in ("Count", "Exist", "Query Attribute")]


# -- the loader ----------------------------------------------------------------------------------

def test_questions_are_aligned_with_their_images(tiny):
    """Re-draw each question's scene from the scenes JSON: it must be the image in its batch."""
    scenes = load(tiny, "val", "scenes")
    questions = load(tiny, "val", "questions")
    with h5py.File(tiny / "prepared" / "val_questions.h5") as f:
        orig = f["orig_idxs"][:]
    for batch in data.make_loader(tiny / "prepared", "val", 7, shuffle=False):
        for img, idx in zip(batch["image"], batch["image_index"]):
            drawn = torch.from_numpy(data.render(scenes[int(idx)])).permute(2, 0, 1).float() / 255
            assert torch.allclose(img, drawn, atol=1 / 255 + 1e-6)
    assert [questions[i]["image_index"] for i in orig] == [q["image_index"] for q in questions]


def test_loader_shuffles_by_seed_and_epoch_and_val_keeps_everything(tiny):
    d = tiny / "prepared"
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


def test_batch_contract(tiny):
    batch = next(iter(data.make_loader(tiny / "prepared", "train", 5, shuffle=True)))
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
    with pytest.raises(data.DataError, match="data.py prepare"):
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


def test_malformed_questions_json(tmp_path):
    (tmp_path / "questions").mkdir()
    (tmp_path / "questions" / "CLEVR_train_questions.json").write_text("{not json")
    with pytest.raises(data.DataError, match="CLEVR_train_questions.json: not valid JSON"):
        data.prepare(tmp_path, tmp_path / "out", log=lambda *a: None)


def test_reading_pngs_without_pillow_says_how_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL":
            raise ImportError("no PIL")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(data.DataError, match="pip install pillow"):
        next(data._read_pngs([tmp_path / "x.png"], print))


def test_cli_generate_tiny(tmp_path, capsys):
    data.main(["generate", "--tiny", "--out", str(tmp_path / "g")])
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
    assert torch.allclose(batch["image"][0, -2, 0], torch.linspace(-1, 1, 4), atol=1e-3)  # x coordinate channel
    assert torch.allclose(batch["image"][0, -1, :, 0], torch.linspace(-1, 1, 4), atol=1e-3)  # y coordinate channel
    assert (tmp_path / "g" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scene_cnn_targets_put_each_object_in_its_cell():
    rng = np.random.default_rng(5)
    scenes = [data.sample_scene(rng, i, "train", 48) for i in range(30)]
    t = data._cell_targets(scenes, 6)  # (N, 4, 6, 6): -1 or the index of each attribute's value
    for i, scene in enumerate(scenes):
        for o in scene["objects"]:
            gx, gy = int(o["pixel_coords"][0] / 8), int(o["pixel_coords"][1] / 8)
            assert t[i, :, gy, gx].tolist() == [data.ATTRIBUTES[a].index(o[a]) for a in data.ATTR_ORDER]
        assert (t[i, 0] >= 0).sum() <= len(scene["objects"])
