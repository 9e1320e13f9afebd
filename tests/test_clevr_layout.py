"""A folder in CLEVR v1.0's own layout and format (`prepare.py generate --clevr-layout`: 480 x 320 RGBA PNGs,
scenes with CLEVR's fields only, up to 10 objects that may overlap), written here, through every image path
of `prepare.py clevr` (scene-cnn, pixels, features), the --train-images / --val-images slice, a smoke run of
MAC with --preset laptop, and clear errors for what such a folder can lack. No Pillow needed."""
import json
import re
import shutil
import struct
import sys
import zlib

import h5py
import numpy as np
import pytest

import data
import mini_clevr
import prepare
import train

QUIET = dict(log=lambda *a, **k: None)
CLEVR_SCENE_KEYS = {"split", "image_index", "image_filename", "objects", "relationships", "directions"}
CLEVR_OBJECT_KEYS = {"shape", "color", "size", "material", "3d_coords", "pixel_coords", "rotation"}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """16 train and 4 val images with scenes, and a test split as the release has it: the val images
    again, questions without answers or programs, no scenes."""
    root = tmp_path_factory.mktemp("clevr-layout")
    mini_clevr.generate(root, tiny=True, clevr_layout=True, train_images=16, val_images=4, questions_per_image=4,
                        max_objects=10, **QUIET)
    shutil.copytree(root / "images" / "val", root / "images" / "test")
    for png in (root / "images" / "test").iterdir():
        png.rename(png.with_name(png.name.replace("val", "test")))
    val = json.loads((root / "questions" / "CLEVR_val_questions.json").read_text())["questions"]
    test = [{"question": q["question"], "image_index": q["image_index"], "split": "test",
             "image_filename": q["image_filename"].replace("val", "test"), "question_index": q["question_index"]}
            for q in val]
    (root / "questions" / "CLEVR_test_questions.json").write_text(json.dumps({"questions": test}))
    return root


def scenes_of(root, split):
    return json.loads((root / "scenes" / f"CLEVR_{split}_scenes.json").read_text())["scenes"]


def test_generator_writes_the_release_layout(layout):
    for split, n in (("train", 16), ("val", 4)):
        pngs = sorted((layout / "images" / split).iterdir())
        assert [p.name for p in pngs] == [f"CLEVR_{split}_{i:06d}.png" for i in range(n)]
        w, h, depth, kind = struct.unpack(">IIBB", pngs[0].read_bytes()[16:26])
        assert (w, h, depth, kind) == (480, 320, 8, 6)  # 480 x 320, 8-bit RGBA
        assert mini_clevr.read_png(pngs[0]).shape == (320, 480, 3)
        scenes = scenes_of(layout, split)
        assert len(scenes) == n and not (layout / "images" / f"{split}.h5").exists()
        for scene in scenes:
            assert set(scene) == CLEVR_SCENE_KEYS and 3 <= len(scene["objects"]) <= 10
            for o in scene["objects"]:
                assert set(o) == CLEVR_OBJECT_KEYS
                assert 0 <= o["pixel_coords"][0] < 480 and 0 <= o["pixel_coords"][1] < 320
            for i, a in enumerate(scene["objects"]):  # relations agree with the picture; front = lower, nearer
                for j in scene["relationships"]["front"][i]:
                    b = scene["objects"][j]
                    assert b["pixel_coords"][1] > a["pixel_coords"][1] and b["pixel_coords"][2] < a["pixel_coords"][2]
    assert max(len(s["objects"]) for s in scenes_of(layout, "train")) > 5  # more than the built-in's 5


def test_builtin_png_writer_round_trips_rgb_and_rgba(tmp_path):
    rng = np.random.default_rng(0)
    for channels in (3, 4):
        img = rng.integers(0, 256, (7, 5, channels), dtype=np.uint8)
        mini_clevr.write_png(tmp_path / "x.png", img)
        assert np.array_equal(mini_clevr.read_png(tmp_path / "x.png"), img[..., :3])


def filter_rows(img, kind):
    """img (H, W, C) uint8 as PNG's rows of filter `kind` (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth), by
    the PNG specification's definitions: (H, 1 + W*C) uint8."""
    h, w, c = img.shape
    raw, prev, out = img.reshape(h, -1).astype(int), np.zeros(w * c, int), []
    for line in raw:
        a, b, d = np.r_[[0] * c, line[:-c]], prev, np.r_[[0] * c, prev[:-c]]
        p = a + b - d
        paeth = np.where((abs(p - a) <= abs(p - b)) & (abs(p - a) <= abs(p - d)), a, np.where(abs(p - b) <= abs(p - d), b, d))
        pred = [0, a, b, (a + b) // 2, paeth][kind]
        out.append(np.r_[kind, (line - pred) % 256])
        prev = line
    return np.array(out, np.uint8)


@pytest.mark.parametrize("kind", range(5))
@pytest.mark.parametrize("channels", [3, 4])
def test_png_reader_undoes_every_filter(tmp_path, kind, channels):
    img = np.random.default_rng(kind).integers(0, 256, (6, 9, channels), dtype=np.uint8)
    rows = filter_rows(img, kind)
    body = zlib.compress(rows.tobytes())
    head = struct.pack(">IIBBBBB", 9, 6, 8, 6 if channels == 4 else 2, 0, 0, 0)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    (tmp_path / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    assert np.array_equal(mini_clevr.read_png(tmp_path / "f.png"), img[..., :3])


def test_scene_cnn_on_the_release_layout_encodes_every_split(layout, tmp_path):
    said = []
    out = prepare.prepare_clevr(layout, tmp_path / "prep", images="scene-cnn", size=64, log=said.append)
    info = data.load_info(out)
    assert info["image_shape"] == (18, 8, 8)
    assert sorted(json.loads((out / "info.json").read_text())["images"]) == ["test", "train", "val"]
    with h5py.File(out / "test_features.h5") as f, h5py.File(out / "val_features.h5") as g:
        assert np.array_equal(f["features"][:], g["features"][:])  # test: val's images, the CNN trained on train
    assert any(line.startswith("  scene CNN on val: cells") for line in said)
    shared = [line for line in said if line.startswith("  scene CNN targets: ")]
    assert len(shared) == 1 and "train objects" in shared[0]


def cell_scene(objects):
    """A CLEVR-format scene (no image_size) of objects given as (x, y, depth, color)."""
    return {"objects": [{"shape": "cube", "size": "large", "material": "metal", "color": c,
                         "pixel_coords": [x, y, d]} for x, y, d, c in objects]}


@pytest.mark.parametrize("objects, cell, color, shared", [
    ([(470, 10, 9.0, "red")], (7, 0), "red", 0),                                  # top right: x / 480, y / 320
    ([(10, 315, 9.0, "red")], (0, 7), "red", 0),                                  # bottom left
    ([(239, 159, 9.0, "red")], (3, 3), "red", 0),                                 # the frame's centre
    ([(100, 100, 9.0, "red"), (110, 105, 8.0, "blue")], (1, 2), "blue", 1),       # the nearer is listed last
    ([(110, 105, 8.0, "blue"), (100, 100, 9.0, "red")], (1, 2), "blue", 1),       # ... or first: the nearer wins
])
def test_cell_targets_in_a_480_x_320_frame_keep_the_nearest(objects, cell, color, shared):
    t, _, n = prepare._cell_targets([cell_scene(objects)], 8, np.array([[480, 320]]))
    gx, gy = cell
    assert t[0, data.ATTR_ORDER.index("color"), gy, gx].item() == data.ATTRIBUTES["color"].index(color)
    assert (t[0, 0] >= 0).sum().item() == len(objects) - shared and n == shared


def test_pixels_keep_the_rgb_of_the_rgba_pngs_resized_to_a_square(layout, tmp_path):
    out = prepare.prepare_clevr(layout, tmp_path / "prep", images="pixels", size=32, **QUIET)
    assert data.load_info(out)["image_shape"] == (3, 32, 32)
    with h5py.File(out / "val_images.h5") as f:
        pixels = f["images"][:]
    rgb = mini_clevr.read_png(layout / "images" / "val" / "CLEVR_val_000002.png")  # (320, 480, 3)
    assert pixels.shape == (4, 3, 32, 32) and np.array_equal(pixels[2], prepare._resize(rgb[None], 32)[0])


def test_features_path_on_the_release_layout(layout, tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        with h5py.File(feats / f"{split}_features.h5", "w") as f:
            f.create_dataset("features", data=np.zeros((n, 1024, 14, 14), np.float16))
    out = prepare.prepare_clevr(layout, tmp_path / "prep", images="features", features_dir=feats, **QUIET)
    assert data.load_info(out)["image_shape"] == (1024, 14, 14)


def test_train_and_val_images_take_the_first_images_and_their_questions(layout, tmp_path):
    prepare.main(["clevr", str(layout), "--out", str(tmp_path / "prep"), "--images", "scene-cnn", "--size", "32",
                  "--train-images", "5", "--val-images", "2"])
    whole = prepare.build_vocab(json.loads((layout / "questions" / "CLEVR_train_questions.json").read_text())["questions"])
    assert json.loads((tmp_path / "prep" / "vocab.json").read_text()) == whole  # the vocabulary of the whole split
    for split, n in (("train", 5), ("val", 2), ("test", 4)):
        questions = json.loads((layout / "questions" / f"CLEVR_{split}_questions.json").read_text())["questions"]
        kept = [q["question_index"] for q in questions if q["image_index"] < n]
        with h5py.File(tmp_path / "prep" / f"{split}_questions.h5") as f:
            assert f["orig_idxs"][:].tolist() == kept and f["image_idxs"][:].max() < n
        with h5py.File(tmp_path / "prep" / f"{split}_features.h5") as f:
            assert len(f["features"]) == n


def test_cli_generate_clevr_layout_prepares_it_and_mac_laptop_runs_on_it(tmp_path, capsys):
    root = tmp_path / "g"
    prepare.main(["generate", "--tiny", "--clevr-layout", "--out", str(root), "--train-images", "16",
                  "--val-images", "4", "--questions-per-image", "4", "--max-objects", "10"])
    assert f"--data {root} --preset laptop" in capsys.readouterr().out
    assert (root / "images" / "train" / "CLEVR_train_000015.png").exists()
    assert data.load_info(root)["image_shape"] == (18, 4, 4)  # scene-CNN features of the tiny size, 32 x 32
    res = train.main(["mac", "--data", str(root), "--preset", "laptop", "--iters", "2", "--threads", "1",
                      "--out", str(tmp_path / "run")])
    assert res["final_acc"] is not None


# -- clear errors, never a traceback ------------------------------------------------------------------

def drop_pixel_coords(root):
    path = root / "scenes" / "CLEVR_train_scenes.json"
    doc = json.loads(path.read_text())
    del doc["scenes"][3]["objects"][1]["pixel_coords"]
    path.write_text(json.dumps(doc))


def damage_png(root):
    png = root / "images" / "train" / "CLEVR_train_000002.png"
    png.write_bytes(png.read_bytes()[:300])


def drop_objects(root):
    path = root / "scenes" / "CLEVR_train_scenes.json"
    doc = json.loads(path.read_text())
    del doc["scenes"][5]["objects"]
    path.write_text(json.dumps(doc))


FAULTS = [  # (what is done to the folder, --images, the message)
    (drop_objects, "scene-cnn", r"CLEVR_train_scenes.json: scene 5 has no 'objects' list"),
    (drop_pixel_coords, "scene-cnn", r"CLEVR_train_scenes.json: scene 3, object 1: no 'pixel_coords'"),
    (lambda r: (r / "scenes" / "CLEVR_train_scenes.json").unlink(), "scene-cnn",
     r"CLEVR_train_scenes.json: no such file; --images scene-cnn learns from the train split's scene annotations"),
    (lambda r: (r / "questions" / "CLEVR_train_questions.json").unlink(), "scene-cnn",
     r"no train split to build the vocabulary from"),
    (lambda r: (r / "images" / "train" / "CLEVR_train_000004.png").unlink(), "pixels",
     r"1 images of split train are missing, e.g. .*CLEVR_train_000004.png"),
    (damage_png, "scene-cnn", r"CLEVR_train_000002.png: not a readable PNG without Pillow"),
]


@pytest.mark.robustness
@pytest.mark.parametrize("damage, images, message", FAULTS)
def test_a_faulty_release_folder_is_named_with_the_fix(layout, tmp_path, damage, images, message, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # the same message with or without Pillow here
    root = tmp_path / "clevr"
    shutil.copytree(layout, root, ignore=shutil.ignore_patterns("prepared"))
    damage(root)
    with pytest.raises(SystemExit) as e:
        prepare.main(["clevr", str(root), "--out", str(tmp_path / "prep"), "--images", images, "--size", "32"])
    assert str(e.value).startswith("error: ") and re.search(message, str(e.value))
    assert not (tmp_path / "prep").exists()


@pytest.mark.robustness
@pytest.mark.parametrize("flag", ["--train-images", "--val-images"])
def test_a_slice_of_no_images_is_refused(layout, tmp_path, flag):
    with pytest.raises(SystemExit, match=f"^error: {flag} 0: must be 1 or more"):
        prepare.main(["clevr", str(layout), "--out", str(tmp_path / "p"), flag, "0"])


@pytest.fixture(scope="module")
def layout_prepared(layout, tmp_path_factory):
    """The release-layout fixture through scene-cnn, as `prepare.py clevr --images scene-cnn` makes it."""
    out = tmp_path_factory.mktemp("layout-prepared") / "prep"
    return prepare.prepare_clevr(layout, out, images="scene-cnn", size=32, log=lambda *a, **k: None)


@pytest.mark.parametrize("argv", [["stack_nmn"], ["stack_nmn", "--layout", "gt"], ["lnmn"], ["pg_ee"],
                                  ["mac", "dact"], ["mac", "act"], ["stack_nmn", "dact"]])
def test_every_model_trains_on_the_release_layout_with_its_laptop_preset(argv, layout_prepared, tmp_path):
    res = train.main([*argv, "--data", str(layout_prepared), "--preset", "laptop", "--iters", "2",
                      "--threads", "1", "--out", str(tmp_path / "run")])
    assert res["final_acc"] is not None and res["out"] == str(tmp_path / "run")
