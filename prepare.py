"""Dataset preparation: a CLEVR-layout folder (real CLEVR, or the built-in mini-CLEVR) -> the prepared
directory that train.py reads (vocab.json, info.json, questions and images h5; the layout is in data.py's
docstring), plus ResNet-101 feature extraction, CLEVR-Humans and GQA.

    python prepare.py generate [--out DIR] [--tiny] [--clevr-layout]  # built-in mini-CLEVR, CLEVR layout + prepared/
    python prepare.py clevr CLEVR_DIR --out DIR [--images pixels|features|scene-cnn] [--size N] [--vocab V]
                            [--train-images N] [--val-images M]   # the first N / M images: CLEVR on a laptop
    python prepare.py features CLEVR_DIR --out DIR [--float16] [--clevr-iep-std]  # ResNet-101 layer3, resumable
    python prepare.py humans HUMANS_DIR --clevr PREPARED_CLEVR --out DIR       # CLEVR-Humans on CLEVR's vocab
    python prepare.py gqa GQA_DIR [--variant balanced|all]                     # GQA -> GQA_DIR/prepared

`python data.py generate|prepare|features|humans|gqa` still works (`prepare` is `clevr` here).

Where the formats come from: the prepared layout and the vocabulary follow facebookresearch/clevr-iep
(scripts/preprocess_questions.py, scripts/extract_features.py: ResNet-101 layer3 of 224 x 224 images);
CLEVR_v1.0's folders follow facebookresearch/clevr-dataset-gen; CLEVR-Humans is Johnson et al., "Inferring
and Executing Programs for Visual Reasoning", ICCV 2017; GQA's files are read as the DACT code reads them
(ceyzaguirre4/DACT-MAC preprocess_GQA.py).
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

import mini_clevr
from data import (ATTR_ORDER, ATTRIBUTES, END, SPECIALS, START, UNK, DataError, check_all_or_none, check_features,
                  check_questions, ensure_builtin, first_line, list_to_prefix, load_json, load_prepared, load_vocab, node_token, resolve,
                  staging_dir, tokenize, vocab_hash)

# ------------------------------------------------------------------------------------------------
# A prepared directory is written whole: into a temporary folder, moved into place when complete
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def staged(out, log=print):
    """Yields a temporary folder beside `out` (data.staging_dir) to write a prepared directory into, and
    moves its files to `out` once the block completes: an existing prepared `out` is replaced by a complete
    new one, or, if the block fails, left as it was. Never a mix of the two (the old info.json goes first,
    the new one comes last). Other files in `out` stay (feature files that info.json names, say), except
    those that the old info.json named as its own and the new one does not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder: pass a folder for the prepared data")
    tmp = staging_dir(out.resolve())
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # an error or Ctrl-C: `out` as it was, nothing left beside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        os.replace(tmp, out)
        return
    new = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == "info.json")  # info.json last
    old, replaced = _own_files(out), (out / "info.json").exists()
    (out / "info.json").unlink(missing_ok=True)  # from here until the new info.json, `out` is not loadable
    for name in old - set(new):
        (out / name).unlink(missing_ok=True)
    for name in new:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    if replaced:
        log(f"  {out}: the prepared data that was there is replaced")


def _own_files(out):
    """The files of a prepared directory `out` that its info.json names as written there by this module."""
    try:
        info = json.loads((out / "info.json").read_text())
        images = {f for f in info["images"].values() if Path(f).name == f}
        return {"vocab.json", "info.json", "humans_stats.json", *images, *(f"{s}_questions.h5" for s in info["images"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no or a broken info.json: nothing
        return set()


# ------------------------------------------------------------------------------------------------
# Questions, compatible with clevr-iep: vocab.json and questions h5
# ------------------------------------------------------------------------------------------------

def build_vocab(questions):
    """Token -> index maps with the specials 0..3 first and the rest sorted (clevr-iep order)."""
    def index(tokens):
        out = dict(SPECIALS)
        for t in sorted(set(tokens) - set(SPECIALS)):
            out[t] = len(out)
        return out
    return {
        "question_token_to_idx": index(t for q in questions for t in tokenize(q["question"])),
        "program_token_to_idx": index(node_token(n) for q in questions for n in q.get("program", [])),
        "answer_token_to_idx": index(q["answer"] for q in questions if "answer" in q),
    }


def _encode(tokens, to_idx, unk_ok, what, fix):
    ids = [START]
    for t in tokens:
        if t not in to_idx and not unk_ok:
            raise DataError(f"{what} {t!r} is not in the vocabulary; {fix}")
        ids.append(to_idx.get(t, UNK))
    return ids + [END]


def encode_questions(questions, vocab, path, tokenizer=tokenize, where=lambda i: f"question {i}", strict=False):
    """Write a clevr-iep questions h5. `programs` (prefix) and `answers` are written only when
    every question has them (the CLEVR test split has neither). A question without words is refused,
    and so is a program token not in `vocab`; with `strict` (a vocabulary made elsewhere, --vocab) any
    word or answer not in it too, as clevr-iep's preprocessing does (otherwise words become <UNK>).
    where(i) names question i in the messages (e.g. `FILE: question i`)."""
    qv, pv, av = (vocab[k] for k in ("question_token_to_idx", "program_token_to_idx", "answer_token_to_idx"))
    fix = ("if --vocab was made for other data, prepare without --vocab to build one from this train split"
           if strict else "the vocabulary comes from the train split, which never uses it: fix or remove this question")
    has_programs = all("program" in q for q in questions)
    has_answers = all("answer" in q for q in questions)
    qs, programs = [], []
    for i, q in enumerate(questions):
        try:
            words = tokenizer(q["question"])
            if not words:  # it would train on a question of padding alone
                raise DataError(f"{q['question'][:60]!r} has no words; fix or remove this question")
            qs.append(_encode(words, qv, not strict, "word", fix))
            if has_programs:
                programs.append(_encode(list_to_prefix(q["program"]), pv, False, "program token", fix))
            if strict and has_answers and q["answer"] not in av:
                raise DataError(f"answer {q['answer']!r} is not in the vocabulary; {fix}")
        except DataError as e:
            raise DataError(f"{where(i)}: {e}") from None
    unk = sum(t == UNK for q in qs for t in q) / max(sum(len(q) - 2 for q in qs), 1)

    def pad(seqs):
        out = np.zeros((len(seqs), max(map(len, seqs))), dtype=np.int32)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s
        return out
    with h5py.File(path, "w") as f:
        f.create_dataset("questions", data=pad(qs))
        f.create_dataset("image_idxs", data=np.array([q["image_index"] for q in questions], dtype=np.int64))
        f.create_dataset("orig_idxs", data=np.array([q.get("question_index", i) for i, q in enumerate(questions)], dtype=np.int64))
        f.create_dataset("question_families", data=np.array([q.get("question_family_index", -1) for q in questions], dtype=np.int64))
        if has_programs:
            f.create_dataset("programs", data=pad(programs))
        if has_answers:
            f.create_dataset("answers", data=np.array([av.get(q["answer"], UNK) for q in questions], dtype=np.int64))
    return unk


# ------------------------------------------------------------------------------------------------
# Images as pixels, and a CLEVR-layout folder -> a prepared directory
# ------------------------------------------------------------------------------------------------

def _resize(images, size):
    """(N, H, W, 3) uint8 -> (N, 3, size, size) uint8, area-antialiased (torch, no image library)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def read_rgb(path):
    """One image file -> (H, W, 3) uint8 (CLEVR's PNGs are RGBA: alpha is dropped). With Pillow when it is
    installed; without it, mini_clevr.read_png reads 8-bit RGB and RGBA PNGs (CLEVR's, the generator's)."""
    try:
        from PIL import Image
    except ImportError:
        try:
            return mini_clevr.read_png(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable PNG without Pillow ({first_line(e)}); download or unzip "
                            "CLEVR's images again, or pip install pillow, which reads every PNG kind") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises OSError, SyntaxError, zlib.error, ... for a damaged file
        raise DataError(f"{path}: not a readable image ({first_line(e)}); download or unzip CLEVR's images "
                        "again") from None


def _check_builtin_images(path, num_images):
    """images/{split}.h5 of a generated folder: a dataset `images` (N, S, S, 3) uint8 with a row for every
    image the questions name, or a DataError that says so."""
    again = "generate the folder again (python prepare.py generate)"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable h5 file ({first_line(e)}); {again}") from None
    with f:
        d = f.get("images")
        if not isinstance(d, h5py.Dataset) or d.ndim != 4 or d.shape[3] != 3 or d.dtype != np.uint8 or len(d) < num_images:
            found = f"'images' {d.shape} {d.dtype}" if isinstance(d, h5py.Dataset) else f"datasets {list(f.keys())}"
            raise DataError(f"{path}: expected a dataset 'images' (N, S, S, 3) uint8 with N >= {num_images} (the "
                            f"images its questions name), found {found}; {again}")


def prepare_pixels(clevr_dir, split, num_images, size, path, log=print):
    """Images of a split as (N, 3, size, size) uint8 in h5 (dataset `images`), row = image_index.
    Reads images/{split}.h5 (the built-in data) or images/{split}/*.png (the release: Pillow, or numpy
    for 8-bit RGB/RGBA PNGs). Returns each image's frame (N, 2): its width and height before resizing.
    NOTE: a non-square image (CLEVR's 480 x 320) is resized to size x size, its aspect ratio not kept,
    as clevr-iep resizes CLEVR to 224 x 224; the scene CNN maps pixel_coords by the same two scales."""
    src = clevr_dir / "images" / f"{split}.h5"
    with h5py.File(path, "w") as out:
        dset = out.create_dataset("images", (num_images, 3, size, size), dtype=np.uint8)
        if src.exists():
            _check_builtin_images(src, num_images)
            with h5py.File(src, "r") as f:
                for i in range(0, num_images, 1024):
                    dset[i:i + 1024] = _resize(f["images"][i:i + 1024], size)
                return np.tile(f["images"].shape[2:0:-1], (num_images, 1))  # (N, 2): W, H
        files = [clevr_dir / "images" / split / f"CLEVR_{split}_{i:06d}.png" for i in range(num_images)]
        missing = [p for p in files if not p.exists()]
        if missing:
            raise DataError(f"{len(missing)} images of split {split} are missing, e.g. {missing[0]}; "
                            f"expected the CLEVR_v1.0 layout images/{split}/CLEVR_{split}_NNNNNN.png")
        frames, t0 = np.zeros((num_images, 2), np.int64), time.time()
        for start in range(0, num_images, 256):
            batch = [read_rgb(png) for png in files[start:start + 256]]
            frames[start:start + len(batch)] = [(im.shape[1], im.shape[0]) for im in batch]
            if len({im.shape for im in batch}) == 1:
                dset[start:start + len(batch)] = _resize(np.stack(batch), size)
            else:  # images of several sizes: one at a time
                dset[start:start + len(batch)] = np.concatenate([_resize(im[None], size) for im in batch])
            if (start + len(batch)) // 1000 > start // 1000:
                log(f"    {start + len(batch)}/{len(files)} images, {(start + len(batch)) / (time.time() - t0):.0f}/s")
        return frames


def _read_questions(clevr_dir, limits):
    """{split: questions} of questions/CLEVR_{split}_questions.json, checked, and the train split whole.
    limits {split: N or None}: keep only the questions on the first N images of that split."""
    if not (clevr_dir / "questions").is_dir():
        raise DataError(f"{clevr_dir}: no questions/ folder; expected the CLEVR_v1.0 layout "
                        f"(images/, questions/, scenes/)")
    splits = [s for s in ("train", "val", "test") if (clevr_dir / "questions" / f"CLEVR_{s}_questions.json").exists()]
    if not splits:
        raise DataError(f"{clevr_dir}/questions has no CLEVR_{{train,val,test}}_questions.json")
    questions_of, whole_train = {}, None
    for s in splits:
        path = clevr_dir / "questions" / f"CLEVR_{s}_questions.json"
        doc = load_json(path, f"{s} questions")
        if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
            raise DataError(f"{path}: expected a JSON object with a 'questions' list")
        questions_of[s] = check_questions(doc["questions"], path)
        whole_train = questions_of[s] if s == "train" else whole_train
        if limits.get(s) is not None:
            questions_of[s] = [q for q in questions_of[s] if q["image_index"] < limits[s]]
            if not questions_of[s]:
                raise DataError(f"{path}: no question is on the first {limits[s]} images; pass a larger --{s}-images")
    return questions_of, whole_train


def prepare_clevr(clevr_dir, out, images="pixels", size=64, vocab=None, features_dir=None, log=print,
                  train_images=None, val_images=None):
    """CLEVR layout -> prepared directory (vocab.json, info.json, questions and images h5).
    train_images / val_images N: the first N images of that split and the questions on them (a slice
    of CLEVR for a laptop); the vocabulary still comes from the whole train split, as without them."""
    clevr_dir, out = Path(clevr_dir), Path(out)
    if type(size) is not int or size < 1 or (images == "scene-cnn" and size % 8):
        raise DataError(f"--size {size}: must be 1 or more" + (", a multiple of 8 (the scene CNN's features have "
                                                               "one cell per 8 x 8 pixels)" if images == "scene-cnn" else ""))
    limits = {"train": train_images, "val": val_images}
    for s, n in limits.items():
        if n is not None and (type(n) is not int or n < 1):
            raise DataError(f"--{s}-images {n}: must be 1 or more (the first N {s} images and their questions)")
    questions_of, whole_train = _read_questions(clevr_dir, limits)
    strict = vocab is not None  # a vocabulary made elsewhere must hold every token of these questions
    if vocab is None:
        if whole_train is None:
            raise DataError("no train split to build the vocabulary from; pass --vocab VOCAB_JSON")
        vocab = build_vocab(whole_train)
    elif not isinstance(vocab, dict):
        vocab = load_vocab(vocab)
    train_scenes = None
    if images == "scene-cnn":  # checked before any image is read
        if "train" not in questions_of:
            raise DataError(f"{clevr_dir}: --images scene-cnn trains its CNN on the train split, and there is none; "
                            "prepare with --images pixels or features")
        train_scenes = load_scenes(clevr_dir, "train", max(q["image_index"] for q in questions_of["train"]) + 1)
    with staged(out, log) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, indent=1))
        info = {"image_kind": images, "images": {}, "source": str(clevr_dir.resolve()), "vocab_hash": vocab_hash(vocab)}
        frames = {}
        for s, questions in questions_of.items():
            source = clevr_dir / "questions" / f"CLEVR_{s}_questions.json"
            unk = encode_questions(questions, vocab, tmp / f"{s}_questions.h5",
                                   where=lambda i: f"{source}: question {i}", strict=strict)
            num_images = max(q["image_index"] for q in questions) + 1
            log(f"  {s}: {len(questions)} questions on {num_images} images"
                + (f" (--{s}-images {limits[s]})" if limits.get(s) else "") + f", {100 * unk:.2f}% <UNK> words")
            if images in ("pixels", "scene-cnn"):
                frames[s] = prepare_pixels(clevr_dir, s, num_images, size, tmp / f"{s}_images.h5", log)
                info["images"][s] = f"{s}_images.h5"
            elif images == "features":
                path = Path(features_dir or clevr_dir) / f"{s}_features.h5"
                check_features(path, num_images)
                info["images"][s] = str(path.resolve())
            else:
                raise DataError(f"--images must be pixels, features or scene-cnn, not {images!r}")
        if images == "scene-cnn":
            info.update(scene_cnn_features(clevr_dir, tmp, size, log=log, frames=frames, train_scenes=train_scenes))
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
    log(f"prepared {', '.join(questions_of)} -> {out}")
    return out


# ------------------------------------------------------------------------------------------------
# Image features for the built-in data: a small CNN trained on the scenes' own annotations
# ------------------------------------------------------------------------------------------------

class SceneCNN(torch.nn.Module):
    """Pixels (B, 3, S, S) -> per-cell predictions (B, 1 + 15 + 2, S/8, S/8): for every 8 x 8 cell, the
    probability that an object is centred there, times that the probabilities of each value of its
    four attributes, and where in the cell its centre lies (x and y, -1 to 1 across the cell). The
    built-in data's stand-in for the ImageNet-pretrained ResNet-101 whose features MAC reads on real
    CLEVR: models then learn to reason, not to see, which is what fits in a laptop's minutes (README,
    "The built-in data")."""

    def __init__(self, channels=32):
        super().__init__()
        nn, layers, c = torch.nn, [], 3
        for ch in (32, 64, 64):  # three stride-2 convs: one cell per 8 x 8 pixels
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.GroupNorm(8, ch), nn.ELU()]
            c = ch
        self.body = nn.Sequential(*layers, nn.Conv2d(c, channels, 3, padding=1), nn.ELU())
        self.heads = nn.Conv2d(channels, 1 + sum(len(v) for v in ATTRIBUTES.values()) + 2, 1)

    def forward(self, x):
        return self.heads(self.body(x))                                  # (B, 1 + 15 + 2, G, G) logits

    def predict(self, x):
        """-> (B, 1 + 15, G, G) object and attribute probabilities, (B, 2, G, G) offsets in the cell."""
        logits = self.forward(x)
        obj = torch.sigmoid(logits[:, :1])                               # (B, 1, G, G)
        sizes = [len(ATTRIBUTES[a]) for a in ATTR_ORDER]
        probs = [obj * part.softmax(1) for part in logits[:, 1:-2].split(sizes, 1)]
        return torch.cat([obj, *probs], 1), torch.tanh(logits[:, -2:])  # (B, 16, G, G), (B, 2, G, G)


def load_scenes(clevr_dir, split, num_images):
    """The first `num_images` scenes of scenes/CLEVR_{split}_scenes.json, each checked for what the scene
    CNN learns from (every object's four attributes and `pixel_coords`), or a DataError that says what
    is wrong and what to do."""
    path = Path(clevr_dir) / "scenes" / f"CLEVR_{split}_scenes.json"
    if not path.exists():
        raise DataError(f"{path}: no such file; --images scene-cnn learns from the {split} split's scene "
                        "annotations (CLEVR_v1.0 has them for train and val): add it, or prepare with "
                        "--images pixels or --images features")
    doc = load_json(path, f"{split} scenes")
    scenes = doc.get("scenes") if isinstance(doc, dict) else None
    if not isinstance(scenes, list) or len(scenes) < num_images:
        raise DataError(f"{path}: expected a JSON object with a 'scenes' list of at least {num_images} scenes (one "
                        f"per image its questions name), found {len(scenes) if isinstance(scenes, list) else 'none'}; "
                        "use the scenes file of the same release as the questions")
    for i, scene in enumerate(scenes[:num_images]):
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if not isinstance(objects, list):
            raise DataError(f"{path}: scene {i} has no 'objects' list; use the scenes file of the CLEVR release")
        for j, o in enumerate(objects):
            xy = o.get("pixel_coords") if isinstance(o, dict) else None
            if not (isinstance(xy, list) and len(xy) >= 2 and all(type(v) in (int, float) for v in xy)):
                raise DataError(f"{path}: scene {i}, object {j}: no 'pixel_coords' [x, y, depth] (found "
                                f"{o if not isinstance(o, dict) else xy!r:.60}); --images scene-cnn needs them, "
                                "as CLEVR v1.0's scenes have: use those, or --images pixels or features")
            bad = [a for a in ATTR_ORDER if o.get(a) not in ATTRIBUTES[a]]
            if bad:
                raise DataError(f"{path}: scene {i}, object {j}: {bad[0]} {o.get(bad[0])!r} is not one of CLEVR's "
                                f"{ATTRIBUTES[bad[0]]}; the scene CNN learns CLEVR's attribute values")
    return scenes[:num_images]


def _placed_objects(scenes, grid, frames=None):
    """(image, object, gx, gy, fx, fy) for every object, in the order the cells are written: (gx, gy) its
    cell of the grid, (fx, fy) where its centre lies in that cell (-1 to 1). frames (N, 2): each image's
    width and height, the frame of its pixel_coords (default: the built-in scenes' square image_size); x and
    y are scaled by grid / width and grid / height (prepare_pixels resizes every image to a square the same
    way). Objects in one cell: the nearest to the camera (the smallest pixel_coords depth, CLEVR's
    convention) comes last and wins, as it occludes the others. The built-in generator's scenes (with
    `image_size`, where the third value is not a depth and objects never overlap) keep their listed order,
    the last one listed winning, so that the built-in data's cells stay as they were."""
    for i, scene in enumerate(scenes):
        w, h = (scene["image_size"],) * 2 if frames is None else frames[i]
        objects = scene["objects"]
        if "image_size" not in scene:  # far to near: the nearest is written last
            objects = sorted(objects, key=lambda o: -o["pixel_coords"][2] if len(o["pixel_coords"]) > 2 else 0)
        for o in objects:
            (gx, fx), (gy, fy) = (_cell_and_offset(v / side * grid, grid) for v, side in
                                  zip(o["pixel_coords"][:2], (w, h)))
            yield i, o, gx, gy, fx, fy


def _cell_and_offset(v, grid):
    """A position in cells (0 to grid) -> its cell, clamped to the grid, and where in it (-1 to 1)."""
    g = max(min(int(v), grid - 1), 0)
    return g, float(np.clip(2 * (v - g) - 1, -1, 1))


def _cell_targets(scenes, grid, frames=None):
    """Per cell: -1 (no object centred there) or the index of each attribute's value (N, 4, G, G); the
    offsets of its centre in the cell, 0 where none (N, 2, G, G); and how many objects share their cell
    with another. Cells and offsets as `_placed_objects` gives them."""
    t = np.full((len(scenes), len(ATTR_ORDER), grid, grid), -1, dtype=np.int64)
    offsets = np.zeros((len(scenes), 2, grid, grid), dtype=np.float32)
    cells, shared = set(), 0
    for i, o, gx, gy, fx, fy in _placed_objects(scenes, grid, frames):
        shared += (i, gx, gy) in cells
        cells.add((i, gx, gy))
        t[i, :, gy, gx] = [ATTRIBUTES[a].index(o[a]) for a in ATTR_ORDER]
        offsets[i, :, gy, gx] = fx, fy
    return torch.from_numpy(t), torch.from_numpy(offsets), shared


def train_scene_cnn(pixels, targets, offsets, channels=32, iters=1500, seed=0, log=print):
    """SceneCNN trained on pixels (N, 3, S, S) uint8 to predict the cell targets (N, 4, G, G) and offsets
    (N, 2, G, G) of `_cell_targets`: Adam, batches of 64 drawn with a generator seeded by `seed`."""
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cnn = SceneCNN(channels)
    opt = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    sizes = [len(ATTRIBUTES[a]) for a in ATTR_ORDER]
    t0 = time.time()
    for it in range(iters):
        idx = torch.randint(0, len(pixels), (64,), generator=gen)
        logits = cnn(pixels[idx].float() / 255)  # (64, 1 + 15 + 2, G, G)
        t = targets[idx]
        present = (t[:, 0] >= 0).float()
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], present)
        for k, part in enumerate(logits[:, 1:-2].split(sizes, 1)):  # on the cells where an object is centred
            loss = loss + F.cross_entropy(part, t[:, k], ignore_index=-1)
        err = (torch.tanh(logits[:, -2:]) - offsets[idx]).square().sum(1)  # (64, G, G)
        loss = loss + (err * present).sum() / present.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % 500 == 0:
            log(f"    scene CNN iteration {it + 1}/{iters}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return cnn.eval()


def _log_scene_cnn_on_val(cnn, clevr_dir, out, grid, frames, log):
    """How well the scene CNN sees, on val: cells with or without an object, and each attribute.
    Nothing when val has no images here or no scenes file (the scenes, when there, are checked)."""
    if not ((out / "val_images.h5").exists() and (clevr_dir / "scenes" / "CLEVR_val_scenes.json").exists()):
        return
    with h5py.File(out / "val_images.h5", "r") as f, torch.no_grad():
        logits = cnn(torch.from_numpy(f["images"][:]).float() / 255)  # (N, 1 + 15 + 2, G, G)
    t, offsets, _ = _cell_targets(load_scenes(clevr_dir, "val", len(logits)), grid, frames)
    present = t[:, 0] >= 0  # (N, G, G)
    sizes = [len(ATTRIBUTES[a]) for a in ATTR_ORDER]
    accs = [((logits[:, 0] > 0) == present).float().mean()] + [
        (part.argmax(1)[present] == t[:, k][present]).float().mean()
        for k, part in enumerate(logits[:, 1:-2].split(sizes, 1))]
    err = (torch.tanh(logits[:, -2:]) - offsets).abs().movedim(1, -1)[present].mean()  # in half cells
    log("  scene CNN on val: cells (object or not) {:.1%}; size {:.1%}, color {:.1%}, material {:.1%}, "
        "shape {:.1%} of the objects; centres within {:.2f} of a cell on average".format(*accs, err / 2))


def scene_cnn_features(clevr_dir, out, size, channels=32, iters=1500, log=print, seed=0, frames=None,
                       train_scenes=None):
    """Train SceneCNN on the train split's pixels and scene annotations, then write its predictions,
    with x and y channels appended (each cell's centre, moved to its object's), as {split}_features.h5
    (float16) in place of the {split}_images.h5 pixels, for every split there (test too: it needs no
    scenes). frames: {split: (N, 2)} the images' widths and heights before resizing (prepare_pixels'
    return; default the built-in scenes' image_size); train_scenes: load_scenes' list, when read
    already. Returns what info.json says about them."""
    grid, frames = size // 8, frames or {}
    with h5py.File(out / "train_images.h5", "r") as f:
        pixels = torch.from_numpy(f["images"][:])  # (N, 3, S, S) uint8
    scenes = train_scenes or load_scenes(clevr_dir, "train", len(pixels))
    targets, offsets, shared = _cell_targets(scenes, grid, frames.get("train"))  # (N, 4, G, G), (N, 2, G, G)
    total = sum(len(sc["objects"]) for sc in scenes)
    log(f"  scene CNN targets: {shared} of {total} train objects ({shared / max(total, 1):.1%}) share their "
        f"cell of the {grid} x {grid} grid with another; the cell learns the nearest")
    t0 = time.time()
    iters = iters if len(pixels) >= 1000 else 30  # the tiny data: a few steps are enough
    cnn = train_scene_cnn(pixels, targets, offsets, channels, iters, seed, log)
    _log_scene_cnn_on_val(cnn, clevr_dir, out, grid, frames.get("val"), log)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    coords = torch.stack([xs, ys])  # (2, G, G): the cells' centres, -1 to 1
    C = 1 + sum(len(v) for v in ATTRIBUTES.values()) + 2  # object, 15 attribute values, x, y
    images = {}
    for split in ("train", "val", "test"):
        src = out / f"{split}_images.h5"
        if not src.exists():
            continue
        with h5py.File(src, "r") as f, h5py.File(out / f"{split}_features.h5", "w") as g, torch.no_grad():
            n = len(f["images"])
            dset = g.create_dataset("features", (n, C, grid, grid), dtype=np.float16)
            for i in range(0, n, 512):
                probs, offset = cnn.predict(torch.from_numpy(f["images"][i:i + 512]).float() / 255)
                # x, y: the cell's centre, moved to the object's as far as the cell holds one (a cell is
                # 2 / (G - 1) wide in these coordinates), so relations read positions finer than cells
                xy = coords + probs[:, :1] * offset / (grid - 1)         # (b, 2, G, G)
                dset[i:i + 512] = torch.cat([probs, xy], 1).numpy()
        src.unlink()  # the pixels are in the CLEVR-layout folder; `prepare.py clevr --images pixels` remakes them
        images[split] = f"{split}_features.h5"
    log(f"  scene CNN: {iters} iterations in {time.time() - t0:.0f}s, features {C} x {grid} x {grid}")
    return {"image_kind": "features", "images": images, "feature_shape": [C, grid, grid],
            "features_from": "scene-cnn"}


# ------------------------------------------------------------------------------------------------
# Real datasets at full fidelity: ResNet-101 features of CLEVR's PNGs, CLEVR-Humans, GQA
# ------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# clevr-iep's scripts/extract_features.py divides by (0.229, 0.224, 0.224): a typo for ImageNet's
# 0.225 that its released checkpoints were trained with. --clevr-iep-std reproduces it.
CLEVR_IEP_STD = (0.229, 0.224, 0.224)


def resnet101_layer3():
    """torchvision's ImageNet ResNet-101 through layer3 (stride 16: 224 x 224 -> 1024 x 14 x 14), as
    clevr-iep. torchvision is needed here only, so it is imported here only."""
    try:
        import torchvision
    except ImportError:
        raise DataError("extracting ResNet-101 features needs torchvision: pip install torchvision "
                        "(the ImageNet weights, about 170 MB, download on first use)") from None
    net = torchvision.models.resnet101(weights="IMAGENET1K_V1")  # the original torchvision weights
    return torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)


def clevr_image_files(clevr_dir, split):
    """images/{split}/CLEVR_{split}_NNNNNN.png in image_index order; every index from 0 must be there."""
    folder = Path(clevr_dir) / "images" / split
    found = {}
    for p in folder.glob(f"CLEVR_{split}_*.png"):
        tail = p.stem.rsplit("_", 1)[1]
        if tail.isdigit():
            found[int(tail)] = p
    if not found:
        raise DataError(f"{folder}: no CLEVR_{split}_NNNNNN.png images; expected the CLEVR_v1.0 layout")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise DataError(f"{folder}: {len(missing)} of {max(found) + 1} images are missing, e.g. "
                        f"CLEVR_{split}_{missing[0]:06d}.png; feature row i must be image i")
    return [found[i] for i in range(len(found))]


def preprocess_image(rgb, size, mean, std):
    """(H, W, 3) uint8 -> (3, size, size) float, as clevr-iep: bicubic resize to size x size, back to
    uint8, / 255, minus the ImageNet mean, over the std.
    NOTE (deviation): torch's antialiased bicubic resize instead of scipy's imresize (PIL bicubic):
    close to, not bit-identical with, clevr-iep's pixels."""
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255)[0] / 255                                     # (3, size, size)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class Progress:
    """A progress bar with rate and ETA: redrawn in place on a terminal, a log line every `every`
    seconds otherwise (a log file of a long job)."""

    def __init__(self, total, done=0, what="images", log=print, every=60.0):
        self.total, self.start, self.what, self.log, self.every = total, done, what, log, every
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty() and log is print

    def update(self, done):
        now = time.time()
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        bar = "#" * int(30 * done / max(self.total, 1))
        line = (f"[{bar:30s}] {done}/{self.total} {self.what} ({100 * done / max(self.total, 1):.1f}%), "
                f"{rate:.1f}/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 8.64e6 else '?'}")
        if self.tty:
            print("\r" + line, end="\n" if done >= self.total else "", file=sys.stderr, flush=True)
        elif now - self.last >= self.every or done >= self.total:
            self.log("    " + line)
            self.last = now


def extract_features(paths, out, backbone, batch_size=128, read_image=None, std=IMAGENET_STD,
                     dtype="float32", size=224, device="cpu", workers=4, log=print):
    """Images `paths` -> `out`, an h5 with dataset `features` (N, C, h, w) (ResNet-101 layer3: 1024 x 14 x
    14), row i = paths[i]: the layout that `check_features` and `prepare.py clevr --images features` read.

    Resumable: rows go to `out`.partial with an attribute `done` (rows written so far, set after each
    batch is written and flushed); a later call with the same images and settings continues from
    there, and the file is renamed to `out` when complete. Works with fewer images than one batch
    (clevr-iep's extractor crashes there). `backbone` maps (B, 3, size, size) to features; tests
    pass a small stand-in, the command line `resnet101_layer3()`. Images are read `workers` at a time
    in threads, one batch ahead of the backbone."""
    out, paths, read_image = Path(out), [str(p) for p in paths], read_image or read_rgb
    partial = out.with_name(out.name + ".partial")
    settings = {"num_images": len(paths), "image_size": size, "mean": list(IMAGENET_MEAN), "std": list(std),
                "dtype": np.dtype(dtype).name,
                "files": hashlib.sha1("\n".join(Path(p).name for p in paths).encode()).hexdigest()[:12]}
    if out.exists():
        log(f"  {out} exists: skipped (delete it to extract again)")
        return out
    if partial.exists():
        try:
            f = h5py.File(partial, "r+")
        except OSError as e:
            raise DataError(f"{partial}: an unreadable partial feature file ({e}), perhaps from a crash "
                            "mid-write; delete it to start this split again") from None
        saved = {k: json.loads(f.attrs["settings"]).get(k) for k in settings} if "settings" in f.attrs else {}
        if saved != settings:
            f.close()
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise DataError(f"{partial} was started with other settings ({', '.join(changed)} differ); "
                            "delete it to start again with these")
    else:
        f = h5py.File(partial, "w")
        f.attrs["settings"], f.attrs["done"] = json.dumps(settings), 0
    backbone = backbone.to(device).eval()
    with f, ThreadPoolExecutor(max(workers, 1)) as pool:
        done = int(f.attrs["done"])
        log(f"  {out.name}: {len(paths)} images" + (f", resuming after {done}" if done else ""))
        progress = Progress(len(paths), done, log=log)
        starts = list(range(done, len(paths), batch_size))
        ahead = [pool.submit(read_image, p) for p in paths[done:done + batch_size]]
        for start in starts:
            images, nxt = [a.result() for a in ahead], start + batch_size
            ahead = [pool.submit(read_image, p) for p in paths[nxt:nxt + batch_size]]  # read the next batch meanwhile
            x = torch.stack([preprocess_image(im, size, IMAGENET_MEAN, std) for im in images]).to(device)
            with torch.inference_mode():
                feats = backbone(x).float().cpu().numpy()                   # (b, C, h, w)
            if "features" not in f:
                f.create_dataset("features", (len(paths), *feats.shape[1:]), dtype=dtype,
                                 chunks=(1, *feats.shape[1:]))
            if f["features"].shape[1:] != feats.shape[1:]:
                raise DataError(f"{partial} holds features {f['features'].shape[1:]}, this backbone gives "
                                f"{feats.shape[1:]}; delete it to start again with this backbone")
            f["features"][start:start + len(feats)] = feats.astype(dtype)
            f.flush()  # the rows are on disk before `done` says so
            f.attrs["done"] = start + len(feats)
            f.flush()
            progress.update(start + len(feats))
    os.replace(partial, out)
    return out


def extract_clevr_features(clevr_dir, out_dir, backbone=None, splits=None, clevr_iep_std=False, **kw):
    """CLEVR_v1.0/images/{split}/*.png -> out_dir/{split}_features.h5 for every split found."""
    clevr_dir, out_dir = Path(clevr_dir), Path(out_dir)
    splits = splits or [s for s in ("train", "val", "test") if (clevr_dir / "images" / s).is_dir()]
    if not splits:
        raise DataError(f"{clevr_dir}/images has no train/, val/ or test/ folder; expected the CLEVR_v1.0 layout")
    files = {s: clevr_image_files(clevr_dir, s) for s in splits}  # check every split before hours of work
    backbone = backbone if backbone is not None else resnet101_layer3()
    out_dir.mkdir(parents=True, exist_ok=True)
    std = CLEVR_IEP_STD if clevr_iep_std else IMAGENET_STD
    return {s: extract_features(files[s], out_dir / f"{s}_features.h5", backbone, std=std, **kw) for s in splits}


# -- CLEVR-Humans: human-written questions on CLEVR's images, no programs ---------------------------

def _read_humans(path, split):
    """The questions of one CLEVR-Humans file, as encode_questions takes them, and the CLEVR split whose
    images they ask about (their image_filename: CLEVR_{split}_{index}.png)."""
    doc = load_json(path, f"CLEVR-Humans {split} questions")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise DataError(f"{path}: expected a JSON object with a 'questions' list")
    questions, image_splits = [], set()
    for i, q in enumerate(doc["questions"]):
        name = q.get("image_filename", "")
        parts = Path(name).stem.split("_")  # CLEVR_{split}_{index}
        if len(parts) != 3 or not parts[2].isdigit():
            raise DataError(f"{path}: question {i} has image_filename {name!r}; expected CLEVR_split_NNNNNN.png")
        image_splits.add(parts[1])
        questions.append({"question": q["question"], "answer": q.get("answer"), "image_index": int(parts[2]),
                          "question_index": q.get("question_index", i)})
        if questions[-1]["answer"] is None:
            del questions[-1]["answer"]
    if len(image_splits) != 1:
        raise DataError(f"{path}: questions on the images of several CLEVR splits ({sorted(image_splits)})")
    check_all_or_none(questions, ("answer",), lambda i: f"{path}: question {i}")
    return questions, image_splits.pop()


def prepare_humans(humans_dir, clevr_prepared, out, log=print):
    """CLEVR-Humans-{train,val,test}.json -> a prepared directory on the vocabulary of an existing
    prepared CLEVR (copied unchanged, so a CLEVR checkpoint fine-tunes on it with --init): words CLEVR
    never had become <UNK> (the rate is reported), and each question reads the CLEVR images of the split
    its image_filename names, through the prepared CLEVR's image files.
    NOTE (deviation): clevr-iep instead adds words seen at least 10 times to the vocabulary
    (--expand_vocab 1 --unk_threshold 10), which changes the embedding's size."""
    humans_dir, out = Path(humans_dir), Path(out)
    clevr = resolve(clevr_prepared)
    vocab, cinfo = load_prepared(clevr)
    splits = {s: humans_dir / f"CLEVR-Humans-{s}.json" for s in ("train", "val", "test")}
    splits = {s: p for s, p in splits.items() if p.exists()}
    if not splits:
        raise DataError(f"{humans_dir}: no CLEVR-Humans-{{train,val,test}}.json")
    info = {k: v for k, v in cinfo.items() if k not in ("images", "source")}
    info.update(dataset="CLEVR-Humans", images={}, source=str(humans_dir.resolve()), vocab_from=str(clevr.resolve()),
                vocab_hash=vocab_hash(vocab))
    qv, av, stats = vocab["question_token_to_idx"], vocab["answer_token_to_idx"], {}
    with staged(out, log) as tmp:
        for s, path in splits.items():
            questions, image_split = _read_humans(path, s)
            if image_split not in cinfo["images"]:
                raise DataError(f"{path} asks about CLEVR {image_split} images, but {clevr} has no {image_split} "
                                f"split; prepare CLEVR's {image_split} split too")
            unk = encode_questions(questions, vocab, tmp / f"{s}_questions.h5", where=lambda i: f"{path}: question {i}")
            new_words = Counter(t for q in questions for t in tokenize(q["question"]) if t not in qv)
            bad_answers = sum("answer" in q and q["answer"] not in av for q in questions)
            info["images"][s] = str((clevr / cinfo["images"][image_split]).resolve())
            stats[s] = {"questions": len(questions), "unk_rate": unk, "new_words": dict(new_words.most_common()),
                        "answers_not_in_vocab": bad_answers, "images_of": image_split}
            log(f"  {s}: {len(questions)} questions on CLEVR {image_split} images, {100 * unk:.2f}% <UNK> words"
                + (f" (most frequent: {', '.join(w for w, _ in new_words.most_common(8))})" if new_words else "")
                + (f"; {bad_answers} answers outside CLEVR's answers (encoded <UNK>)" if bad_answers else ""))
        shutil.copyfile(clevr / "vocab.json", tmp / "vocab.json")  # byte for byte: the same vocabulary hash
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        (tmp / "humans_stats.json").write_text(json.dumps(stats, indent=1))
    log(f"prepared CLEVR-Humans {', '.join(splits)} -> {out} (vocabulary of {clevr})")
    return out, stats


# -- GQA, as the DACT code reads it (ceyzaguirre4/DACT-MAC preprocess_GQA.py, dataset.py) ------------
#   GQA_DIR/questions/{split}_{all|balanced}_questions.json, or a folder of such files (train_all)
#   GQA_DIR/features/objects/gqa_objects_{0..15}.h5: features (n, 100, 2048), bboxes (n, 100, 4) pixels
#   GQA_DIR/features/objects/gqa_objects_info.json: imageId -> {file, idx, objectsNum, width, height}

def tokenize_gqa(text):
    """Lowercase; words, clitics ('s) and punctuation as tokens.
    NOTE (deviation): the DACT code uses nltk.word_tokenize; this regex agrees on GQA's plain questions
    but splits "don't" as don / 't (nltk: do / n't)."""
    return re.findall(r"\w+|'\w+|[^\w\s]", text.lower())


def _gqa_question_files(gqa_dir, split, variant):
    for folder in ("questions", "questions1.2", "."):
        base = Path(gqa_dir) / folder / f"{split}_{variant}_questions"
        if base.is_dir():
            return sorted(base.glob("*.json"))
        if base.with_name(base.name + ".json").exists():
            return [base.with_name(base.name + ".json")]
    raise DataError(f"{gqa_dir}/questions: no {split}_{variant}_questions.json (or folder of them); "
                    "expected the GQA layout that the DACT code reads (README, 'Real datasets')")


def gqa_objects(gqa_dir, out, log=print):
    """The object features of all images as one h5 without copying them: `features` (N, 100, 2048) is
    a virtual dataset over gqa_objects_*.h5 (absolute paths: keep GQA_DIR where it is), next to
    `boxes` (N, 100, 4) in [0, 1] (x1, y1, x2, y2 over width and height) and `num_objects` (N,).
    Returns {imageId: row}."""
    odir = Path(gqa_dir) / "features" / "objects"
    meta = load_json(odir / "gqa_objects_info.json", "GQA object features info")
    files = sorted((p for p in odir.glob("gqa_objects_*.h5") if p.stem.rsplit("_", 1)[1].isdigit()),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        raise DataError(f"{odir}: no gqa_objects_N.h5 files; download GQA's object features and unpack them there")
    offsets, shape, rows = {}, None, 0
    for p in files:
        with h5py.File(p, "r") as f:
            if "features" not in f or f["features"].ndim != 3:
                raise DataError(f"{p}: expected a dataset 'features' (n, objects, 2048)")
            if shape is not None and f["features"].shape[1:] != shape:
                raise DataError(f"{p}: features {f['features'].shape[1:]}, but {files[0]} has {shape}")
            shape, dtype = f["features"].shape[1:], f["features"].dtype
            offsets[int(p.stem.rsplit("_", 1)[1])] = (rows, f["features"].shape[0])
            rows += f["features"].shape[0]
    layout = h5py.VirtualLayout((rows, *shape), dtype)
    boxes, num = np.zeros((rows, shape[0], 4), np.float32), np.zeros(rows, np.int64)
    where = {}
    for image_id, m in meta.items():
        if m["file"] not in offsets or m["idx"] >= offsets[m["file"]][1]:
            raise DataError(f"{odir}/gqa_objects_info.json: image {image_id} is at row {m['idx']} of file "
                            f"{m['file']}, which is not there; the info and the h5 files do not match")
        where[image_id] = offsets[m["file"]][0] + m["idx"]
    for p in files:
        start, n = offsets[int(p.stem.rsplit("_", 1)[1])]
        layout[start:start + n] = h5py.VirtualSource(str(p.resolve()), "features", shape=(n, *shape))
        with h5py.File(p, "r") as f:
            if "bboxes" in f:
                boxes[start:start + n] = f["bboxes"][:]
    for image_id, m in meta.items():
        r = where[image_id]
        boxes[r] /= np.array([m["width"], m["height"]] * 2, np.float32)
        num[r] = m["objectsNum"]
    with h5py.File(out, "w") as f:
        f.create_virtual_dataset("features", layout)
        f.create_dataset("boxes", data=boxes)
        f.create_dataset("num_objects", data=num)
    log(f"  objects: {len(meta)} images, {shape[0]} x {shape[1]} features per image in {len(files)} files "
        f"(virtual dataset, nothing copied)")
    return where


def _read_gqa(paths, split):
    """[(question id, question)] of a GQA split's question files, in order, and where(i): `FILE: question ID`
    of question i."""
    out, origin = [], []
    for path in paths:
        doc = load_json(path, f"GQA {split} questions")
        if not isinstance(doc, dict):
            raise DataError(f"{path}: expected a JSON object {{question id: question}}")
        out += [(qid, q) for qid, q in doc.items()]
        origin += [path] * len(doc)

    def where(i):
        return f"{origin[i]}: question {out[i][0]}"
    check_all_or_none([q for _, q in out], ("answer",), where)
    return out, where


def prepare_gqa(gqa_dir, out=None, variant="balanced", val_split="testdev", log=print):
    """GQA -> a prepared directory (default GQA_DIR/prepared, so `train.py --data GQA_DIR` finds it).
    train = {train}_{variant}; val = {val_split}_balanced (the DACT code validates on testdev balanced).
    Words and answers come from the train questions ('<UNK>' elsewhere); there are no programs; each
    question's family is its GQA `types.detailed` (names in info.json)."""
    gqa_dir = Path(gqa_dir)
    out = Path(out) if out else gqa_dir / "prepared"
    if variant not in ("balanced", "all"):
        raise DataError(f"variant must be balanced or all, not {variant!r}")
    sources = {"train": ("train", variant), "val": (val_split, "balanced")}
    files = {s: _gqa_question_files(gqa_dir, *src) for s, src in sources.items()}  # all there before work
    with staged(out, log) as tmp:
        row_of = gqa_objects(gqa_dir, tmp / "objects.h5", log)
        raw, where = {}, {}
        for s, paths in files.items():
            raw[s], where[s] = _read_gqa(paths, s)
        words = Counter(t for _, q in raw["train"] for t in tokenize_gqa(q["question"]))
        answers = Counter(q["answer"] for _, q in raw["train"] if "answer" in q)
        index = lambda names: {**SPECIALS, **{t: len(SPECIALS) + i for i, t in enumerate(sorted(set(names) - set(SPECIALS)))}}
        vocab = {"question_token_to_idx": index(words), "program_token_to_idx": dict(SPECIALS),
                 "answer_token_to_idx": index(answers)}
        families = sorted({q.get("types", {}).get("detailed") for qs in raw.values() for _, q in qs} - {None})
        family_of = {f: i for i, f in enumerate(families)}
        for s, qs in raw.items():
            missing = [q["imageId"] for _, q in qs if q["imageId"] not in row_of]
            if missing:
                raise DataError(f"{len(missing)} {s} questions ask about images without object features, e.g. "
                                f"{missing[0]}; is gqa_objects_info.json from the same release?")
            questions = [{"question": q["question"], "image_index": row_of[q["imageId"]],
                          "question_index": int(qid) if qid.isdigit() else i,
                          "question_family_index": family_of.get(q.get("types", {}).get("detailed"), -1),
                          **({"answer": q["answer"]} if "answer" in q else {})} for i, (qid, q) in enumerate(qs)]
            unk = encode_questions(questions, vocab, tmp / f"{s}_questions.h5", tokenizer=tokenize_gqa, where=where[s])
            unseen = sum(q.get("answer") not in vocab["answer_token_to_idx"] for q in questions if "answer" in q)
            log(f"  {s} ({'/'.join(p.name for p in files[s][:3])}{'...' if len(files[s]) > 3 else ''}): "
                f"{len(questions)} questions, {100 * unk:.2f}% <UNK> words"
                + (f", {unseen} answers never seen in train" if unseen else ""))
        (tmp / "vocab.json").write_text(json.dumps(vocab, indent=1))
        with h5py.File(tmp / "objects.h5", "r") as f:
            shape = list(f["features"].shape[1:])
        info = {"dataset": "GQA", "image_kind": "objects", "images": {"train": "objects.h5", "val": "objects.h5"},
                "feature_shape": shape, "family_names": families, "source": str(gqa_dir.resolve()),
                "questions_from": {s: f"{a}_{b}" for s, (a, b) in sources.items()}, "vocab_hash": vocab_hash(vocab)}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
    log(f"prepared GQA ({variant}, val = {val_split} balanced): {len(vocab['question_token_to_idx'])} words, "
        f"{len(vocab['answer_token_to_idx'])} answers -> {out}")
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the built-in mini-CLEVR (CLEVR layout) and prepare it")
    g.add_argument("--out", default=None, help="default: the cache folder that train.py uses")
    g.add_argument("--tiny", action="store_true", help="a few dozen images, for tests")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-images", type=int)
    g.add_argument("--val-images", type=int)
    g.add_argument("--questions-per-image", type=int)
    g.add_argument("--image-size", type=int)
    g.add_argument("--max-objects", type=int)
    g.add_argument("--clevr-layout", action="store_true",
                   help="images as the CLEVR release has them: 480 x 320 RGBA PNGs images/SPLIT/CLEVR_SPLIT_NNNNNN.png, "
                        "scenes with CLEVR's fields only, objects may overlap (up to --max-objects, at most 10)")
    r = sub.add_parser("clevr", help="CLEVR_v1.0 folder -> prepared folder (vocab, h5)")
    r.add_argument("clevr_dir")
    r.add_argument("--out", required=True, help="the prepared folder; one that exists is replaced only once the "
                                                 "new one is complete")
    r.add_argument("--images", choices=("pixels", "features", "scene-cnn"), default="pixels",
                   help="scene-cnn: features of a small CNN trained on the scenes (the built-in data)")
    r.add_argument("--size", type=int, default=64, help="pixels: resize images to SIZE x SIZE")
    r.add_argument("--features-dir", help="features: folder with {split}_features.h5 (default: CLEVR_DIR)")
    r.add_argument("--vocab", help="encode with this existing vocab.json instead of building one")
    r.add_argument("--train-images", type=int, metavar="N", help="only the first N train images and their "
                                                                  "questions (a slice of CLEVR for a laptop)")
    r.add_argument("--val-images", type=int, metavar="M", help="only the first M val images and their questions")
    x = sub.add_parser("features", help="ResNet-101 layer3 features of CLEVR's PNGs (needs torchvision, Pillow)")
    x.add_argument("clevr_dir")
    x.add_argument("--out", required=True, help="writes {split}_features.h5 here (clevr --features-dir)")
    x.add_argument("--splits", nargs="+", choices=("train", "val", "test"), help="default: every split found")
    x.add_argument("--batch-size", type=int, default=128, help="images per forward pass (clevr-iep: 128)")
    x.add_argument("--float16", action="store_true", help="store float16: half the disk (about 40 GB instead of 80)")
    x.add_argument("--clevr-iep-std", action="store_true",
                   help=f"normalise with clevr-iep's std {CLEVR_IEP_STD} (its 0.224 typo for ImageNet's 0.225), "
                        "to match features and checkpoints made with clevr-iep")
    x.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    x.add_argument("--workers", type=int, default=8, help="threads reading PNGs")
    h = sub.add_parser("humans", help="CLEVR-Humans questions onto a prepared CLEVR's vocabulary and images")
    h.add_argument("humans_dir", help="folder with CLEVR-Humans-{train,val,test}.json")
    h.add_argument("--clevr", required=True, help="the prepared CLEVR directory whose checkpoint you fine-tune")
    h.add_argument("--out", required=True)
    q = sub.add_parser("gqa", help="GQA questions and object features (the DACT code's layout) -> prepared")
    q.add_argument("gqa_dir")
    q.add_argument("--out", help="default: GQA_DIR/prepared (then train.py --data GQA_DIR finds it)")
    q.add_argument("--variant", choices=("balanced", "all"), default="balanced", help="training questions")
    q.add_argument("--val-split", choices=("testdev", "val"), default="testdev",
                   help="questions for validation, balanced (DACT code: testdev)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "generate":
            if args.out is None:
                print(ensure_builtin(args.tiny))
                return
            sizes = {k: getattr(args, k) for k in mini_clevr.LIMITS}
            mini_clevr.generate(args.out, tiny=args.tiny, seed=args.seed, clevr_layout=args.clevr_layout, **sizes)
            size = args.image_size or mini_clevr.BUILTIN["tiny" if args.tiny else "default"]["image_size"]
            prepare_clevr(args.out, Path(args.out) / "prepared", images="scene-cnn", size=size)
            # --data alone picks the paper preset (train.py); this data is the built-in kind, so say laptop
            print(f"train with: python train.py mac --data {args.out} --preset laptop")
        elif args.cmd == "features":
            device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
            extract_clevr_features(args.clevr_dir, args.out, splits=args.splits, clevr_iep_std=args.clevr_iep_std,
                                   batch_size=args.batch_size, dtype="float16" if args.float16 else "float32",
                                   device=device, workers=args.workers)
            print(f"next: python prepare.py clevr {args.clevr_dir} --out DIR --images features --features-dir {args.out}")
        elif args.cmd == "humans":
            prepare_humans(args.humans_dir, args.clevr, args.out)
            print(f"fine-tune with: python train.py mac --data {args.out} --init CLEVR_RUN/best.pt")
        elif args.cmd == "gqa":
            out = prepare_gqa(args.gqa_dir, args.out, args.variant, args.val_split)
            print(f"train with: python train.py mac --data {out}")
        elif args.cmd == "clevr":
            prepare_clevr(args.clevr_dir, args.out, args.images, args.size, args.vocab, args.features_dir,
                          train_images=args.train_images, val_images=args.val_images)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
