"""Tests for the real-dataset paths of prepare.py (CLEVR features, CLEVR-Humans, GQA) and for MAC / DACT on
GQA's object features. Nothing is downloaded: every fixture is written here, small, in the real format
(480 x 320 RGBA PNGs in CLEVR_v1.0's layout, CLEVR-Humans JSON, GQA's question JSON and object h5 files),
and a small stand-in network takes ResNet-101's place (torchvision and Pillow are not needed).
"""
import json
import struct
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import analyze
import dact
import data
import mac
import prepare
import train

QUIET = dict(log=lambda *a, **k: None)
TINY = ["--dim", "16", "--embed-dim", "8", "--batch-size", "8", "--log-every", "1000"]


# ----------------------------------------------------------------------------------------------------
# CLEVR images in the release's format, read without Pillow

def write_rgba_png(path, rgba):
    """An 8-bit RGBA PNG (color type 6, filter 0), as CLEVR's are RGBA."""
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].tobytes() for y in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def read_png(path):
    """Reads the PNGs above (filter 0 only): the stand-in for Pillow that prepare.extract_features injects."""
    buf, pos, idat = Path(path).read_bytes(), 8, b""
    while pos < len(buf):
        n, tag = struct.unpack(">I4s", buf[pos:pos + 8])
        if tag == b"IHDR":
            w, h = struct.unpack(">II", buf[pos + 8:pos + 16])
        elif tag == b"IDAT":
            idat += buf[pos + 8:pos + 8 + n]
        pos += 12 + n
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 4 * w)
    assert not rows[:, 0].any(), "filter 0 only"
    return rows[:, 1:].reshape(h, w, 4)


def stand_in():
    """A ResNet-101-through-layer3 stand-in: (B, 3, 224, 224) -> (B, 1024, 14, 14), stride 16."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AvgPool2d(16), torch.nn.Conv2d(3, 1024, 1))


class Interrupt(torch.nn.Module):
    """The stand-in, with a Ctrl-C on its `at`-th batch."""

    def __init__(self, at):
        super().__init__()
        self.net, self.calls, self.at = stand_in(), 0, at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.net(x)


EXIST_CUBE = [{"function": "scene", "inputs": [], "value_inputs": []},
              {"function": "filter_shape", "inputs": [0], "value_inputs": ["cube"]},
              {"function": "exist", "inputs": [1], "value_inputs": []}]


@pytest.fixture
def clevr(tmp_path):
    """CLEVR_v1.0's layout: 7 train and 2 val 480 x 320 RGBA PNGs, each a different gradient, and questions."""
    root = tmp_path / "CLEVR_v1.0"
    yy, xx = np.mgrid[0:320, 0:480]
    for split, n in (("train", 7), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        for i in range(n):
            rgb = np.stack([xx * 255 // 479, yy * 255 // 319, np.full_like(xx, 30 * i)], -1)
            rgba = np.concatenate([rgb, np.full_like(xx, 255)[..., None]], -1).astype(np.uint8)
            write_rgba_png(root / "images" / split / f"CLEVR_{split}_{i:06d}.png", rgba)
        qs = [{"question": "Is there a cube?", "answer": "yes", "program": EXIST_CUBE, "image_index": i,
               "image_filename": f"CLEVR_{split}_{i:06d}.png", "question_family_index": 0, "question_index": i,
               "split": split} for i in reversed(range(n))]
        (root / "questions").mkdir(exist_ok=True)
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps({"questions": qs}))
    return root


def features_of(paths, std=prepare.IMAGENET_STD):
    x = torch.stack([prepare.preprocess_image(read_png(p), 224, prepare.IMAGENET_MEAN, std) for p in paths])
    with torch.no_grad():
        return stand_in()(x).numpy()


# ----------------------------------------------------------------------------------------------------
# CLEVR features

def test_features_are_the_backbone_on_preprocessed_images_and_prepare_reads_them(clevr, tmp_path):
    out = tmp_path / "feats"
    prepare.extract_clevr_features(clevr, out, backbone=stand_in(), batch_size=3, read_image=read_png, **QUIET)
    files = prepare.clevr_image_files(clevr, "train")
    with h5py.File(out / "train_features.h5") as f:
        feats = f["features"][:]
        assert feats.shape == (7, 1024, 14, 14) and feats.dtype == np.float32 and f.attrs["done"] == 7
    np.testing.assert_allclose(feats, features_of(files), rtol=1e-5, atol=1e-5)  # row i = image i
    assert not list(out.glob("*.partial"))
    prep = prepare.prepare_clevr(clevr, tmp_path / "prep", images="features", features_dir=out, **QUIET)
    batch = next(iter(data.make_loader(prep, "train", 8, shuffle=False)))
    np.testing.assert_array_equal(batch["image"].numpy(), feats[batch["image_index"].numpy()])
    assert batch["image_index"].tolist() == [6, 5, 4, 3, 2, 1, 0]


def test_preprocessing_uses_imagenet_mean_and_std_or_clevr_iep_typo():
    rgba = np.full((320, 480, 4), 200, np.uint8)  # a uniform image: the resize keeps 200
    good = prepare.preprocess_image(rgba, 224, prepare.IMAGENET_MEAN, prepare.IMAGENET_STD)
    typo = prepare.preprocess_image(rgba, 224, prepare.IMAGENET_MEAN, prepare.CLEVR_IEP_STD)
    assert good.shape == (3, 224, 224)
    expect = [(200 / 255 - m) / s for m, s in zip(prepare.IMAGENET_MEAN, prepare.IMAGENET_STD)]
    assert torch.allclose(good[:, 0, 0], torch.tensor(expect), atol=1e-5)
    assert torch.equal(good[:2], typo[:2]) and torch.allclose(typo[2] * 0.224, good[2] * 0.225)


@pytest.mark.robustness  # a Ctrl-C injected during extraction
def test_extraction_resumes_where_it_was_interrupted(clevr, tmp_path):
    files = prepare.clevr_image_files(clevr, "train")
    ref = features_of(files)
    out = tmp_path / "train_features.h5"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the second batch of three
        prepare.extract_features(files, out, Interrupt(at=2), batch_size=3, read_image=read_png, **QUIET)
    partial = tmp_path / "train_features.h5.partial"
    assert not out.exists() and partial.exists()
    with h5py.File(partial) as f:
        assert f.attrs["done"] == 3
    reads = []
    prepare.extract_features(files, out, stand_in(), batch_size=3, read_image=lambda p: reads.append(p) or read_png(p),
                          **QUIET)
    assert [Path(p).name for p in reads] == [p.name for p in files[3:]]  # the first batch is not redone
    assert out.exists() and not partial.exists()
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["features"][:], ref, rtol=1e-5, atol=1e-5)
    logs = []
    prepare.extract_features(files, out, stand_in(), read_image=read_png, log=logs.append)  # done: nothing to do
    assert "skipped" in logs[0]


@pytest.mark.robustness  # a Ctrl-C injected during extraction
def test_a_partial_file_of_other_settings_is_refused(clevr, tmp_path):
    files = prepare.clevr_image_files(clevr, "train")
    out = tmp_path / "train_features.h5"
    with pytest.raises(KeyboardInterrupt):
        prepare.extract_features(files, out, Interrupt(at=2), batch_size=3, read_image=read_png, **QUIET)
    with pytest.raises(data.DataError, match=r"other settings \(std differ\); delete it"):
        prepare.extract_features(files, out, stand_in(), std=prepare.CLEVR_IEP_STD, read_image=read_png, **QUIET)


def test_cli_fewer_images_than_a_batch_float16_typo_std_and_progress(clevr, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "resnet101_layer3", stand_in)  # what `features` builds without torchvision
    monkeypatch.setattr(prepare, "read_rgb", read_png)
    out = tmp_path / "feats"
    prepare.main(["features", str(clevr), "--out", str(out), "--splits", "val", "--batch-size", "8", "--float16",
               "--clevr-iep-std", "--device", "cpu", "--workers", "2"])
    printed = capsys.readouterr().out
    assert "ETA" in printed and "2/2 images" in printed and "--features-dir" in printed
    with h5py.File(out / "val_features.h5") as f:
        assert f["features"].shape == (2, 1024, 14, 14) and f["features"].dtype == np.float16
        assert json.loads(f.attrs["settings"])["std"] == list(prepare.CLEVR_IEP_STD)
        np.testing.assert_allclose(f["features"][:].astype(np.float32),
                                   features_of(prepare.clevr_image_files(clevr, "val"), prepare.CLEVR_IEP_STD),
                                   rtol=2e-3, atol=2e-3)
    assert data.check_features(out / "val_features.h5", 2) == "features"


def test_missing_images_and_libraries_say_what_to_do(clevr, monkeypatch):
    (clevr / "images" / "train" / "CLEVR_train_000004.png").unlink()
    with pytest.raises(data.DataError, match="1 of 7 images are missing, e.g. CLEVR_train_000004.png"):
        prepare.clevr_image_files(clevr, "train")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(data.DataError, match="pip install torchvision"):
        prepare.resnet101_layer3()
    png = clevr / "images" / "val" / "CLEVR_val_000001.png"  # without Pillow: CLEVR's RGBA PNGs read with numpy
    assert np.array_equal(prepare.read_rgb(png), read_png(png)[..., :3])
    png.write_bytes(png.read_bytes()[:200])  # cut short: a damaged file
    with pytest.raises(data.DataError, match=rf"^{png}: not a readable PNG without Pillow .*pip install pillow"):
        prepare.read_rgb(png)


# ----------------------------------------------------------------------------------------------------
# CLEVR-Humans

def write_humans(root, new_answer=False):
    root.mkdir(parents=True, exist_ok=True)
    qs = {"train": [("What color is the thingamajig behind the sphere?", "blue", "train", 3),
                    ("Are there any blocks that look like the metal cube?", "yes", "train", 0),
                    ("How many objects are there?", "3", "train", 5)] * 6,
          "val": [("What color is the big thing?", "gray" if not new_answer else "mauve", "train", 1)],
          "test": [("Is the shiny ball bigger than the cube?", "no", "val", 2)]}
    for split, rows in qs.items():
        doc = {"questions": [{"question": q, "answer": a, "image_filename": f"CLEVR_{s}_{i:06d}.png", "split": split}
                             for q, a, s, i in rows]}
        (root / f"CLEVR-Humans-{split}.json").write_text(json.dumps(doc))
    return qs


def test_humans_use_the_clevr_vocabulary_with_unk_for_new_words(tiny_data, tmp_path):
    qs = write_humans(tmp_path / "humans", new_answer=True)
    out, stats = prepare.prepare_humans(tmp_path / "humans", tiny_data, tmp_path / "prep", **QUIET)
    assert (out / "vocab.json").read_bytes() == (tiny_data / "vocab.json").read_bytes()
    assert data.load_info(out)["vocab_hash"] == data.load_info(tiny_data)["vocab_hash"]  # --init accepts it
    vocab = json.loads((tiny_data / "vocab.json").read_text())
    qv, av = vocab["question_token_to_idx"], vocab["answer_token_to_idx"]
    assert {"what", "color", "is", "the"} <= set(qv) and "thingamajig" not in qv
    with h5py.File(out / "train_questions.h5") as f:
        got, answers, images = f["questions"][:], f["answers"][:], f["image_idxs"][:]
        assert "programs" not in f and set(f["question_families"][:]) == {-1}
    words = [t for q, *_ in qs["train"] for t in data.tokenize(q)]
    for row, (q, a, _, i) in zip(got, qs["train"]):
        expect = [data.START] + [qv.get(t, data.UNK) for t in data.tokenize(q)] + [data.END]
        assert row[:len(expect)].tolist() == expect and not row[len(expect):].any()
    assert answers.tolist() == [av[a] for _, a, _, _ in qs["train"]] and images.tolist() == [i for *_, i in qs["train"]]
    rate = sum(t not in qv for t in words) / len(words)
    assert 0 < rate < 0.5 and stats["train"]["unk_rate"] == pytest.approx(rate)
    assert "thingamajig" in stats["train"]["new_words"] and stats["val"]["answers_not_in_vocab"] == 1
    # train and val ask about CLEVR train images, test about CLEVR val images: each reads the right file
    info, clevr_info = json.loads((out / "info.json").read_text()), json.loads((tiny_data / "info.json").read_text())
    assert info["images"]["test"] == str((tiny_data / clevr_info["images"]["val"]).resolve())
    assert info["images"]["val"] == str((tiny_data / clevr_info["images"]["train"]).resolve())
    batch = next(iter(data.make_loader(out, "test", 4, shuffle=False)))
    with h5py.File(tiny_data / clevr_info["images"]["val"]) as f:
        assert torch.equal(batch["image"][0], torch.from_numpy(f["features"][2]).float())
    assert batch["kind"].tolist() == [-1] and batch["answer"].tolist() == [av["no"]]


def test_a_clevr_checkpoint_fine_tunes_on_humans_with_init(tiny_data, tmp_path, capsys):
    write_humans(tmp_path / "humans")
    humans = tmp_path / "prep"
    prepare.main(["humans", str(tmp_path / "humans"), "--clevr", str(tiny_data), "--out", str(humans)])
    flags = [*TINY, "--max-steps", "2", "--epochs", "1"]
    train.main(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "clevr-run"), *flags, "--iters", "3"])
    res = train.main(["mac", "--data", str(humans), "--out", str(tmp_path / "humans-run"), *flags,
                      "--init", str(tmp_path / "clevr-run" / "best.pt")])
    printed = capsys.readouterr().out
    assert "EMA weights from" in printed and res["final_acc"] is not None
    val_line = [line for line in printed.splitlines() if line.startswith("val after epoch")][-1]  # the Humans run
    assert "Count" not in val_line  # no CLEVR question kinds on Humans: no empty per-kind columns


# ----------------------------------------------------------------------------------------------------
# GQA, in the layout the DACT code reads

GQA_IMAGES = {"2354786": (0, 0, 7, 500, 333), "2375429": (0, 1, 3, 640, 480), "n161313": (0, 2, 100, 500, 375),
              "2417468": (1, 0, 1, 800, 600), "n578564": (1, 1, 12, 375, 500)}  # id: file, idx, objects, w, h


def write_gqa(root):
    """questions/ (balanced JSONs and a train_all folder of two files) and features/objects/ (two h5 files
    of (n, 100, 2048) features and pixel boxes, and the info JSON). Object j of image r has features
    r * 1000 + j (padded objects: 0)."""
    odir = root / "features" / "objects"
    odir.mkdir(parents=True)
    (odir / "gqa_objects_info.json").write_text(json.dumps(
        {k: {"file": f, "idx": i, "objectsNum": n, "width": w, "height": h} for k, (f, i, n, w, h) in GQA_IMAGES.items()}))
    for file in (0, 1):
        imgs = [(k, v) for k, v in GQA_IMAGES.items() if v[0] == file]
        feats, boxes = np.zeros((len(imgs), 100, 2048), np.float32), np.zeros((len(imgs), 100, 4), np.float32)
        for r, (k, (_, i, n, w, h)) in enumerate(imgs):
            feats[i, :n] = list(GQA_IMAGES).index(k) * 1000 + np.arange(n)[:, None]
            boxes[i, :n] = [0, 0, w / 2, h]
        with h5py.File(odir / f"gqa_objects_{file}.h5", "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("bboxes", data=boxes)
    ids = list(GQA_IMAGES)
    templates = [("Is the man's shirt white?", "yes", "verifyAttr"), ("What is on the table?", "cup", "relS"),
                 ("Which side is the dog on?", "left", "positionQuery"), ("Is the sky dark or light?", "light", "chooseAttr")]
    train = {str(100 + k): {"imageId": ids[k % 5], "question": q, "answer": a, "fullAnswer": a,
                            "types": {"structural": "verify", "semantic": "attr", "detailed": d}, "isBalanced": True}
             for k, (q, a, d) in enumerate(templates * 5)}
    testdev = {"201": {"imageId": "n578564", "question": "Is the zebra striped?", "answer": "yes",
                       "types": {"detailed": "verifyAttr"}},
               "202": {"imageId": "n161313", "question": "What is on the table?", "answer": "plate",
                       "types": {"detailed": "relS"}}}
    (root / "questions" / "train_all_questions").mkdir(parents=True)
    (root / "questions" / "train_balanced_questions.json").write_text(json.dumps(train))
    (root / "questions" / "testdev_balanced_questions.json").write_text(json.dumps(testdev))
    items = list(train.items())
    for part in (0, 1):
        (root / "questions" / "train_all_questions" / f"train_all_questions_{part}.json").write_text(
            json.dumps(dict(items[part::2] + [(f"9{part}", {**items[0][1], "question": "Is it fluffy?"})])))
    return train, testdev


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa") / "GQA"
    train_q, testdev_q = write_gqa(root)
    with pytest.raises(data.DataError, match="looks like a GQA folder: run `python prepare.py gqa"):
        data.resolve(root)
    prepare.prepare_gqa(root, **QUIET)
    return root, train_q, testdev_q


def test_gqa_questions_and_objects_line_up(gqa, tmp_path):
    root, train_q, testdev_q = gqa
    info = data.load_info(root)  # GQA_DIR finds GQA_DIR/prepared
    assert info["image_kind"] == "objects" and info["image_shape"] == (100, 2048) and info["dataset"] == "GQA"
    vocab = json.loads((root / "prepared" / "vocab.json").read_text())
    assert prepare.tokenize_gqa("Is the man's shirt white?") == ["is", "the", "man", "'s", "shirt", "white", "?"]
    assert "'s" in vocab["question_token_to_idx"] and "zebra" not in vocab["question_token_to_idx"]
    assert set(vocab["answer_token_to_idx"]) == {*data.SPECIALS, "yes", "cup", "left", "light"}
    ids = list(GQA_IMAGES)
    for split, qs in (("train", train_q), ("val", testdev_q)):
        batch = next(iter(data.make_loader(root, split, 64, shuffle=False)))
        assert batch["image"].shape == (len(qs), 100, 2048) and batch["boxes"].shape == (len(qs), 100, 4)
        for b, q in enumerate(qs.values()):  # each question sees its own image's objects, boxes and count
            r, n, h = ids.index(q["imageId"]), GQA_IMAGES[q["imageId"]][2], GQA_IMAGES[q["imageId"]][4]
            assert batch["image"][b, :n, 0].tolist() == [r * 1000 + j for j in range(n)]
            assert batch["num_objects"][b] == n and batch["boxes"][b, 0].tolist() == [0, 0, 0.5, 1.0]
            assert h > 0 and batch["kind"][b] == -1
    answers = {i: a for a, i in vocab["answer_token_to_idx"].items()}
    assert answers[batch["answer"][1].item()] == "<UNK>"  # "plate" was never a train answer
    names = json.loads((root / "prepared" / "info.json").read_text())["family_names"]
    assert analyze.family_names(root / "prepared") == names and "verifyAttr" in names
    prepare.main(["gqa", str(root), "--out", str(tmp_path / "all"), "--variant", "all"])  # a folder of files
    with h5py.File(tmp_path / "all" / "train_questions.h5") as f:
        assert len(f["questions"]) == len(train_q) + 2


def gqa_batch(root, n=8):
    info = data.load_info(root)
    return info, next(iter(data.make_loader(root, "train", n, shuffle=False)))


@pytest.mark.parametrize("boxes", [False, True])
def test_mac_reads_only_real_objects(gqa, boxes):
    info, batch = gqa_batch(gqa[0])
    torch.manual_seed(0)
    model = mac.MAC(mac.MACConfig(dim=16, embed_dim=8, max_steps=4, object_boxes=boxes), info).eval()
    assert isinstance(model.input.stem, mac.ObjectStem)
    ctx = model.encode(batch)
    state = model.init_state(ctx)
    for t in range(4):
        state = model.step(ctx, state, t)
        rv = state["read_attn"]                                          # (B, 100)
        assert torch.allclose(rv.sum(1), torch.ones(len(rv)))
        assert (rv[~ctx["knowledge_mask"]] == 0).all() and ctx["knowledge_mask"].sum(1).tolist() == batch["num_objects"].tolist()
    out = model(batch)["log_probs"]
    padded = batch["image"].clone()
    padded[~ctx["knowledge_mask"]] = 123.0  # what sits in the padded slots does not matter
    assert torch.allclose(model(dict(batch, image=padded))["log_probs"], out, atol=1e-6)
    model.train()
    loss = torch.nn.functional.nll_loss(model(batch)["log_probs"], batch["answer"])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for n, p in model.named_parameters() if "q_step" not in n)


def test_dact_on_a_gqa_batch(gqa):
    info, batch = gqa_batch(gqa[0])
    torch.manual_seed(0)
    model = dact.DACT(mac.MAC(mac.MACConfig(dim=16, embed_dim=8, max_steps=4), info), dact.DACTConfig())
    out = model(batch)  # training: every step
    (torch.nn.functional.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"]).backward()
    assert torch.isfinite(out["log_probs"]).all() and out["steps"].eq(4).all()
    with torch.no_grad():
        ev = model.eval()(batch)  # inference: halting rows leave the batch, knowledge_mask with them
    assert torch.isfinite(ev["log_probs"]).all() and ((1 <= ev["steps"]) & (ev["steps"] <= 4)).all()


def test_train_mac_dact_on_gqa_dir_picks_the_gqa_preset(gqa, tmp_path, capsys):
    root = gqa[0]
    res = train.main(["mac", "dact", "--data", str(root), "--out", str(tmp_path / "run"), *TINY])
    printed = capsys.readouterr().out
    assert "preset gqa (--data is GQA): max_steps=4 (paper 12), epochs=5 (paper 30)" in printed  # DACT's 30
    assert res["final_acc"] is not None and "avg steps" in printed
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["epoch"] == 5 and all(v is None for v in rec["acc_by_kind"].values())


@pytest.mark.robustness  # questions without the answer that the others have
def test_humans_and_gqa_refuse_a_question_without_the_answer_the_others_have(tiny_data, tmp_path):
    write_humans(tmp_path / "humans")
    path = tmp_path / "humans" / "CLEVR-Humans-train.json"
    doc = json.loads(path.read_text())
    del doc["questions"][3]["answer"]
    path.write_text(json.dumps(doc))
    with pytest.raises(data.DataError, match=rf"^{path}: question 3 has no 'answer', but 17 of the 18 questions"):
        prepare.prepare_humans(tmp_path / "humans", tiny_data, tmp_path / "prep", **QUIET)
    write_gqa(tmp_path / "GQA")
    path = tmp_path / "GQA" / "questions" / "train_balanced_questions.json"
    doc = json.loads(path.read_text())
    del doc["105"]["answer"]
    path.write_text(json.dumps(doc))
    with pytest.raises(data.DataError, match=rf"^{path}: question 105 has no 'answer', but 19 of the 20"):
        prepare.prepare_gqa(tmp_path / "GQA", **QUIET)
    assert sorted(p.name for p in (tmp_path / "GQA").iterdir()) == ["features", "questions"]  # no prepared/
