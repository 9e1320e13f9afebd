"""mini_clevr.py: the generator's invariants (deterministic by seed, answers from the executor, every
question kind and function, relations that agree with the picture, no answer guessable from its family)."""
import h5py
import numpy as np

import data
import mini_clevr


def test_generator_is_deterministic(tmp_path, tiny_clevr, clevr_json):
    mini_clevr.generate(tmp_path, tiny=True, log=lambda *a: None)
    for split in ("train", "val"):
        for what in ("questions", "scenes"):
            assert (tmp_path / what / f"CLEVR_{split}_{what}.json").read_bytes() == \
                   (tiny_clevr / what / f"CLEVR_{split}_{what}.json").read_bytes()
        with h5py.File(tmp_path / "images" / f"{split}.h5") as a, h5py.File(tiny_clevr / "images" / f"{split}.h5") as b:
            assert np.array_equal(a["images"][:], b["images"][:])
    other = tmp_path / "seed1"
    mini_clevr.generate(other, tiny=True, seed=1, log=lambda *a: None)
    assert clevr_json(other, "train", "questions") != clevr_json(tiny_clevr, "train", "questions")


def test_every_answer_is_the_executors_answer(tiny_clevr, clevr_json):
    for split in ("train", "val"):
        scenes = clevr_json(tiny_clevr, split, "scenes")
        for q in clevr_json(tiny_clevr, split, "questions"):
            assert data.execute(q["program"], scenes[q["image_index"]]) == q["answer"]


def test_questions_are_well_posed_and_cover_every_kind_and_function():
    rng = np.random.default_rng(0)
    _, questions = mini_clevr.generate_split(rng, "train", 120, 10, 64)
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


def test_relations_agree_with_the_picture(tiny_clevr, clevr_json):
    for scene in clevr_json(tiny_clevr, "train", "scenes"):
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
        scene = mini_clevr.sample_scene(rng, k, "train", 64)
        img = mini_clevr.render(scene).astype(int)
        for o in scene["objects"]:
            x, y = (int(v) for v in o["pixel_coords"][:2])
            rgb = np.array(mini_clevr.RGB[o["color"]])
            if o["material"] == "rubber":  # matte: the centre pixel is close to the object's colour
                assert np.abs(img[y, x] - rgb).max() < 40, (o, img[y, x])
            else:  # metal: darker body, and a highlight much brighter than the body
                patch = img[y - 3:y + 1, x - 3:x + 1].sum(-1)
                assert patch.max() > img[y + 2, x + 2].sum() + 60, o


def test_majority_per_family_baseline_needs_the_image():
    train = mini_clevr.generate_split(np.random.default_rng([0, 0]), "train", 400, 10, 64)[1]
    val = mini_clevr.generate_split(np.random.default_rng([0, 1]), "val", 150, 10, 64)[1]
    assert mini_clevr.majority_baseline(train, val) <= 0.45


def test_the_cache_folder_is_named_after_the_generator_version(monkeypatch, tmp_path):
    monkeypatch.setenv("MINI_CLEVR_CACHE", str(tmp_path))
    assert data.builtin_dir(tiny=True) == tmp_path / f"tiny-v{mini_clevr.GENERATOR_VERSION}"
    assert data.builtin_dir().name == f"default-v{mini_clevr.GENERATOR_VERSION}"  # a bump makes a new cache

