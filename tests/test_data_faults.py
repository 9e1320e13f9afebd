"""data.py, prepare.py and train.py on hostile inputs: malformed questions JSON, unknown program functions,
missing images, h5 files of the wrong shape or dtype, a vocabulary from elsewhere. Each must give one DataError
(one `error: ...` line from train.py) that names the file; fuzzed JSON and programs give nothing else.
"""
import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

import data
import prepare
import train

pytestmark = pytest.mark.robustness  # bad input and fuzzing: `pytest -m "not robustness"` skips them
QUIET = dict(log=lambda *a, **k: None)
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def good_question(**changes):
    program = [{"function": "scene", "inputs": []}, {"function": "filter_color", "inputs": [0], "value_inputs": ["red"]},
               {"function": "count", "inputs": [1]}]
    return {"question": "How many red things are there?", "answer": "1", "program": program, "image_index": 0,
            "question_family_index": 0, **changes}


def prepare_questions(root, questions, **kw):
    (root / "questions").mkdir(parents=True, exist_ok=True)
    path = root / "questions" / "CLEVR_train_questions.json"
    path.write_text(json.dumps({"questions": questions}) if not isinstance(questions, str) else questions)
    kw.setdefault("images", "features")
    kw.setdefault("features_dir", root / "no-features")
    return prepare.prepare_clevr(root, root / "out", **kw, **QUIET)


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


# ----------------------------------------------------------------------------------------------------
# Questions JSON and programs

def node(fn, inputs, *values):
    return {"function": fn, "inputs": inputs, "value_inputs": list(values)}


@pytest.mark.parametrize("question, message", [
    ("not a dict", "is 'not a dict', not an object"),
    ({"answer": "yes", "image_index": 0}, "'question' is None, not a string"),
    (good_question(image_index="7"), "'image_index' is '7', not an image number"),
    (good_question(image_index=-1), "'image_index' is -1"),
    (good_question(answer=3), "'answer' is 3, not a string"),
    (good_question(program=[node("scene", []), node("filter_colour", [0], "red"), node("count", [1])]),
     "program node 1: unknown function 'filter_colour' (CLEVR's: count, equal_color"),
    (good_question(program=[node("scene", []), node("count", [2]), node("exist", [1])]),
     "program node 1 (count): inputs [2] are not indices of earlier nodes"),
    (good_question(program=[node("scene", []), node("union", [0])]), "program node 1 (union) has 1 inputs; union takes 2"),
    (good_question(program=[node("scene", []), node("filter_color", [0]), node("count", [1])]),
     "program node 1 (filter_color): value_inputs []; filter_color takes 1 string(s)"),
    (good_question(program=[]), "a program is a non-empty list of nodes"),
    (good_question(program=[node("scene", [])] + [node("union", [i, i]) for i in range(8)]),
     "roots a tree of more than 200 nodes"),  # shared inputs that would expand to 511 nodes
    (good_question(question=" ? "), "' ? ' has no words"),  # it would be a question of padding alone
])
def test_a_bad_question_names_the_file_the_question_and_the_fix(tmp_path, question, message):
    with pytest.raises(data.DataError) as e:
        prepare_questions(tmp_path, [good_question(), question])
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'questions' / 'CLEVR_train_questions.json'}: question 1: ")
    assert message in text and text.endswith("fix or remove this question")


@pytest.mark.parametrize("key", ["answer", "program"])
def test_a_question_without_the_answer_or_program_that_the_others_have(tmp_path, key):
    """One question without its answer would drop the answers of the whole split, silently."""
    questions = [good_question(), good_question(), good_question()]
    del questions[1][key]
    with pytest.raises(data.DataError) as e:
        prepare_questions(tmp_path, questions)
    assert str(e.value) == (f"{tmp_path / 'questions' / 'CLEVR_train_questions.json'}: question 1 has no {key!r}, "
                            f"but 2 of the 3 questions have one; a split has {key}s in every question or in none: "
                            f"add the {key} to the 1 questions without, or remove them")


def test_malformed_questions_files(tmp_path):
    for i, (text, message) in enumerate([("[1, 2]", "expected a JSON object with a 'questions' list"),
                                         ('{"questions": []}', "the 'questions' list is empty"),
                                         ('{"questions": [', "not valid JSON")]):
        with pytest.raises(data.DataError, match=message) as e:
            prepare_questions(tmp_path / str(i), text)
        assert "CLEVR_train_questions.json" in str(e.value)


def test_missing_image_files_are_named(tmp_path):
    with pytest.raises(data.DataError, match=r"1 images of split train are missing, e.g. .*CLEVR_train_000000.png"):
        prepare_questions(tmp_path, [good_question()], images="pixels")
    with pytest.raises(data.DataError, match=r"no-features/train_features.h5: no such feature file"):
        prepare_questions(tmp_path / "f", [good_question()])


@pytest.mark.parametrize("other, missing", [
    (good_question(question="How many blue things are there?"), "word 'red'"),
    (good_question(answer="2"), "answer '1'"),
    (good_question(program=[node("scene", []), node("filter_color", [0], "blue"), node("count", [1])]),
     "program token 'filter_color[red]'"),
], ids=["word", "answer", "program"])
def test_a_vocabulary_from_other_data_is_refused_even_when_large_enough(tmp_path, other, missing):
    """--vocab: every token must be in it, as in clevr-iep's preprocessing (before, words and answers not
    in it became <UNK> without a word)."""
    more = good_question(question="Is there a cube?", answer="yes", program=[node("scene", []), node("exist", [0])])
    vocab = prepare.build_vocab([other, more])  # a vocabulary of other data, with more tokens than needed
    (tmp_path / "other.json").write_text(json.dumps(vocab))
    with pytest.raises(data.DataError) as e:
        prepare_questions(tmp_path, [good_question()], vocab=tmp_path / "other.json")
    assert str(e.value) == (f"{tmp_path / 'questions' / 'CLEVR_train_questions.json'}: question 0: {missing} is not "
                            "in the vocabulary; if --vocab was made for other data, prepare without --vocab to build "
                            "one from this train split")


def test_a_broken_vocabulary_file(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"question_token_to_idx": {"a": 5}}))
    with pytest.raises(data.DataError, match=r"broken.json: question_token_to_idx .* 0..n-1.*prepare the data again"):
        prepare_questions(tmp_path / "b", [good_question()], vocab=tmp_path / "broken.json")


def test_a_vocabulary_swapped_into_a_prepared_folder_is_refused(prepared, tmp_path):
    vocab = json.loads((prepared / "vocab.json").read_text())
    vocab["question_token_to_idx"]["zebra"] = len(vocab["question_token_to_idx"])  # every index still fits
    (prepared / "vocab.json").write_text(json.dumps(vocab))
    msg = error_of(["mac", "--data", str(prepared), "--out", str(tmp_path / "run"), "--iters", "1", "--dim", "8"])
    assert msg.startswith(f"error: {prepared / 'vocab.json'} is vocabulary {data.vocab_hash(vocab)}, but the data "
                          "was prepared with vocabulary ") and "prepare the data again" in msg
    with pytest.raises(data.DataError, match="is vocabulary"):
        data.Split(prepared, "val")


# ----------------------------------------------------------------------------------------------------
# A prepared directory with one file made bad: train.py says which, in one line

@pytest.fixture
def prepared(tiny_data, tmp_path):
    out = tmp_path / "prepared"
    shutil.copytree(tiny_data, out)
    info = json.loads((out / "info.json").read_text())
    for split, f in info["images"].items():  # the features may be named by absolute path: copy them too
        shutil.copy(Path(tiny_data) / Path(f).name if not Path(f).is_absolute() else f, out / Path(f).name)
        info["images"][split] = Path(f).name
    (out / "info.json").write_text(json.dumps(info))
    return out


def rewrite_h5(path, name, array):
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_dataset(name, data=array)


def change_h5(path, name, change):
    """Dataset `name` of h5 `path` read, changed by change(array) (in place, or returned), written back."""
    with h5py.File(path, "a") as f:
        a = f[name][:]
        out = change(a)
        del f[name]
        f.create_dataset(name, data=a if out is None else out)


@pytest.mark.parametrize("damage, message", [
    (lambda d: rewrite_h5(d / "train_questions.h5", "questions", np.zeros((4, 5), np.float32)),
     "train_questions.h5: dataset 'questions' is (4, 5) float32; expected 2-D integers"),
    (lambda d: rewrite_h5(d / "train_questions.h5", "answers", np.full(4, 10 ** 6)),
     "'answers' holds values from 1000000 to 1000000, outside 0.."),
    (lambda d: rewrite_h5(d / "train_questions.h5", "image_idxs", np.zeros(3, np.int64)),
     "train_questions.h5: its datasets have different lengths"),
    (lambda d: (d / "train_questions.h5").write_bytes(b"not h5"), "train_questions.h5: not a readable h5 file"),
    (lambda d: (d / "train_questions.h5").unlink(), "train_questions.h5: no such file (questions)"),
    (lambda d: rewrite_h5(d / "train_features.h5", "features", np.zeros((4, 18, 3, 3), np.float16)),
     "train_features.h5: dataset 'features' has shape (4, 18, 3, 3)"),
    (lambda d: rewrite_h5(d / "train_features.h5", "features", np.zeros((4, 18, 4, 4), np.int8)),
     "and dtype int8; expected float (N, 18, 4, 4)"),
    (lambda d: (d / "train_features.h5").unlink(), "train_features.h5: no such feature file"),
    (lambda d: (d / "vocab.json").write_text('{"question_token_to_idx": []}'), "vocab.json: question_token_to_idx"),
    (lambda d: (d / "info.json").write_text('{"images": 3}'), "info.json: expected image_kind pixels|features"),
    (lambda d: change_h5(d / "train_features.h5", "features", lambda a: a.__setitem__((2, 5, 1, 1), np.nan)),
     "train_features.h5: feature row 2 (image 2) holds NaN; the file is damaged or the network that made it diverged"),
    (lambda d: change_h5(d / "val_features.h5", "features", lambda a: a.__setitem__((3, 0, 0, 0), -np.inf)),
     "val_features.h5: feature row 3 (image 3) holds inf"),
    (lambda d: change_h5(d / "train_questions.h5", "questions", lambda a: a.__setitem__(4, 0)),
     "train_questions.h5: question row 4 has no tokens (padding alone); prepare the data again"),
    (lambda d: [change_h5(d / "train_questions.h5", k, lambda a: a[:0]) for k in ("questions", "image_idxs",
                "orig_idxs", "question_families", "programs", "answers")], "train_questions.h5: no questions"),
])
def test_a_bad_file_in_a_prepared_directory_is_named(prepared, tmp_path, damage, message):
    damage(prepared)
    msg = error_of(["mac", "--data", str(prepared), "--out", str(tmp_path / "run"), "--iters", "1", "--dim", "8"])
    assert message in msg


def test_nan_features_read_per_batch_from_h5_are_named(prepared):
    """Feature files too large for memory are read per batch: each batch's rows are checked."""
    change_h5(prepared / "train_features.h5", "features", lambda a: a.__setitem__((6, 1, 0, 2), np.inf))
    split = data.Split(prepared, "train", max_memory=0)  # rows from h5, per batch
    rows = np.flatnonzero(split.image_idxs == 6)
    split.batch(np.flatnonzero(split.image_idxs != 6)[:8])
    with pytest.raises(data.DataError, match=r"train_features.h5: feature row 6 \(image 6\) holds inf"):
        split.batch(rows)


def test_pixel_images_of_the_wrong_dtype(prepared, tmp_path):
    with h5py.File(prepared / "train_images.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((4, 3, 8, 8), np.float32))
    info = json.loads((prepared / "info.json").read_text())
    (prepared / "info.json").write_text(json.dumps(dict(info, image_kind="pixels", images={"train": "train_images.h5"})))
    msg = error_of(["mac", "--data", str(prepared), "--out", str(tmp_path / "run"), "--iters", "1"])
    assert "train_images.h5: expected a dataset 'images' (N, 3, H, W) uint8, found (4, 3, 8, 8) float32" in msg


# ----------------------------------------------------------------------------------------------------
# Fuzzing: nothing but DataError comes out of the JSON and program parsing

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
FN = st.sampled_from(sorted(data.FUNCTIONS)) | st.text(max_size=12) | JSON
VALUE = st.sampled_from(["red", "cube", "left", "", "a]b[c"]) | st.text(max_size=4)
NODE = st.fixed_dictionaries({"function": FN}, optional={
    "inputs": st.lists(st.integers(-2, 8), max_size=3) | JSON, "value_inputs": st.lists(VALUE, max_size=2) | JSON,
    "type": FN, "side_inputs": JSON})


@st.composite
def clevr_programs(draw):
    """A valid CLEVR program (a random tree), then, half the time, one node's field replaced by junk."""
    def tree(depth):
        fn = draw(st.sampled_from(sorted(data.FUNCTIONS)) if depth < 4 else st.just("scene"))
        value = [draw(VALUE)] if fn.startswith("filter_") or fn == "relate" else []
        tokens = [f"{fn}[{value[0]}]" if value else fn]
        for _ in range(data.arity(fn)):
            tokens += tree(depth + 1)
        return tokens
    program = data.prefix_to_list(tree(0))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(program) - 1))
        program[i][draw(st.sampled_from(["function", "inputs", "value_inputs"]))] = draw(JSON | FN)
    return program


PROGRAMS = clevr_programs() | st.lists(NODE, max_size=6) | JSON


@FUZZ
@given(PROGRAMS)
def test_fuzz_program_lists(program):
    try:
        tokens = data.list_to_prefix(program)
    except data.DataError:
        return
    assert all(isinstance(t, str) for t in tokens) and len(tokens) <= data.MAX_PROGRAM_NODES
    assert data.tree_to_prefix(data.prefix_to_tree(tokens)) == tokens
    assert data.list_to_prefix(data.prefix_to_list(tokens)) == tokens


@FUZZ
@given(st.lists(st.sampled_from(sorted(data.FUNCTIONS) + ["filter_color[red]", "relate[left]"]) | st.text(max_size=5)
                | JSON, max_size=12) | JSON)
def test_fuzz_prefix_programs(tokens):
    try:
        tree = data.prefix_to_tree(tokens)
    except data.DataError:
        return
    assert data.tree_to_prefix(tree) == tokens


QUESTION = st.fixed_dictionaries(
    {"question": st.text(max_size=20) | JSON, "image_index": st.integers(-1, 3) | JSON},
    optional={"answer": st.sampled_from(["yes", "2"]) | JSON, "program": PROGRAMS,
              "question_family_index": st.integers(-2, 3) | JSON, "question_index": JSON}) | JSON


@FUZZ
@given(st.binary(max_size=40) | st.builds(lambda q: json.dumps({"questions": q}).encode(), st.lists(QUESTION, max_size=3))
       | st.builds(lambda d: json.dumps(d).encode(), JSON))
def test_fuzz_questions_json_through_prepare(raw):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "questions").mkdir()
        (root / "questions" / "CLEVR_train_questions.json").write_bytes(raw)
        with pytest.raises(data.DataError) as e:  # valid questions end at the missing feature file
            prepare.prepare_clevr(root, root / "out", images="features", features_dir=root / "none", **QUIET)
        assert "CLEVR_train_questions.json" in str(e.value) or "none/train_features.h5: no such feature file" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Checkpoints that torch.load(weights_only=True) refuses or cannot read

class Touch:
    """Unpickling this would create a file: a callable in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class Call:
    """Unpickling this calls `fn()`."""

    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return (self.fn, ())


@pytest.mark.parametrize("payload, blocked", [
    (lambda tmp: argparse.Namespace(lr=1e-4), "GLOBAL argparse.Namespace"),  # an object of a class
    (lambda tmp: Touch(tmp / "ran"), "GLOBAL getattr"),  # a callable, Path.touch, reached through getattr
    (lambda tmp: Call(os.getcwd), "GLOBAL posix.getcwd whose module posix is blocked"),
])
def test_a_checkpoint_of_python_objects_is_refused_by_name_not_called_damaged(tmp_path, payload, blocked):
    torch.save({"config": payload(tmp_path)}, tmp_path / "objects.pt")
    with pytest.raises(data.DataError) as e:
        data.read_checkpoint(tmp_path / "objects.pt")
    msg = str(e.value)
    assert msg.startswith(f"cannot read checkpoint {tmp_path / 'objects.pt'}: it holds Python objects that "
                          "weights_only loading refuses (") and "nothing in it was run" in msg
    assert blocked in msg and "damaged" not in msg and "\n" not in msg and "weights_only=False" not in msg
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "(EOFError, an empty file (0 bytes)); the file is damaged or not a checkpoint"),
    (bytes(range(256)), "(UnpicklingError: Unsupported operand"),  # torch's reason, not its advice
], ids=["empty", "garbage"])
def test_an_empty_or_garbage_checkpoint_is_reported_as_damaged(tmp_path, content, reason):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(data.DataError) as e:
        data.read_checkpoint(tmp_path / "bad.pt", hint=". Restore the previous one")
    assert str(e.value).startswith(f"cannot read checkpoint {tmp_path / 'bad.pt'} ") and reason in str(e.value)
    assert str(e.value).endswith("not a checkpoint. Restore the previous one")


def test_first_line_of_an_exception():
    assert data.first_line(EOFError()) == "EOFError"
    assert data.first_line(OSError("\n  unable to open\nmore")) == "OSError: unable to open"


# ----------------------------------------------------------------------------------------------------
# Interrupted preparation and generation

def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_a_failed_prepare_leaves_the_prepared_folder_as_it_was(tiny_clevr, tmp_path):
    out = tmp_path / "prepared"
    shutil.copytree(tiny_clevr / "prepared", out)  # pixels at 32 x 32
    before = snapshot(out)
    source = tmp_path / "clevr"
    shutil.copytree(tiny_clevr, source, ignore=shutil.ignore_patterns("prepared"))
    (source / "images" / "val.h5").unlink()  # fails at the val split, after train's files at 16 x 16
    with pytest.raises(data.DataError, match="images of split val are missing"):
        prepare.prepare_clevr(source, out, size=16, **QUIET)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["clevr", "prepared"]


def test_stale_temporary_folders_of_killed_processes_are_removed(tmp_path):
    final, host, dead = tmp_path / "default-v3", socket.gethostname(), 2 ** 31 - 1  # beyond any PID
    names = {"legacy": f"default-v3.tmp-{dead}", "dead": f"default-v3.tmp-{host}-{dead}",
             "live": f"default-v3.tmp-{host}-{os.getppid()}", "elsewhere": f"default-v3.tmp-other-host-{dead}"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "questions").mkdir()
    tmp = data.staging_dir(final)
    assert tmp.name == f"default-v3.tmp-{host}-{os.getpid()}" and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["elsewhere"]])


def test_ensure_builtin_removes_a_killed_generation(tiny_data, monkeypatch):
    cache = Path(tiny_data).parents[1]  # CACHE/tiny-vN/prepared
    stale = cache / f"{Path(tiny_data).parent.name}.tmp-{2 ** 31 - 1}"
    (stale / "questions").mkdir(parents=True)
    monkeypatch.setenv("MINI_CLEVR_CACHE", str(cache))
    assert data.ensure_builtin(tiny=True, **QUIET) == tiny_data and not stale.exists()


# ----------------------------------------------------------------------------------------------------
# prepare.py generate: sizes the generator cannot honour; damaged images

@pytest.mark.parametrize("flags, message", [
    (["--image-size", "20"], "--image-size 20: must be a multiple of 8, 8 or more (the scene CNN's features"),
    (["--train-images", "2"], "--train-images 2: must be 16 or more (preview.png shows the first 16)"),
    (["--train-images", "0"], "--train-images 0: must be 16 or more"),  # 0 was taken as the default
    (["--val-images", "-1"], "--val-images -1: must be 1 or more"),
    (["--questions-per-image", "82"], "--questions-per-image 82: must be from 1 to 81"),
    (["--max-objects", "2"], "--max-objects 2: must be from 3 to 10"),
    (["--max-objects", "11"], "--max-objects 11: must be from 3 to 10"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
])
def test_generate_refuses_sizes_it_cannot_honour_before_writing(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        prepare.main(["generate", "--tiny", "--out", str(tmp_path / "g"), *flags])
    assert str(e.value.code).startswith(f"error: {message}") and not (tmp_path / "g").exists()


def test_a_scene_cnn_size_that_is_no_multiple_of_8(tiny_clevr, tmp_path):
    with pytest.raises(data.DataError, match=r"--size 20: must be 1 or more, a multiple of 8"):
        prepare.prepare_clevr(tiny_clevr, tmp_path / "out", images="scene-cnn", size=20, **QUIET)


def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not h5"), "not a readable h5 file (OSError: "),
    (lambda p: write_h5(p), "found datasets []"),
    (lambda p: write_h5(p, images=np.zeros((3, 32, 32, 3), np.uint8)),
     "with N >= 16 (the images its questions name), found 'images' (3, 32, 32, 3) uint8"),
    (lambda p: write_h5(p, images=np.zeros((16, 3, 32, 32), np.float32)), "found 'images' (16, 3, 32, 32) float32"),
], ids=["not-h5", "empty", "too-few", "layout"])
def test_a_bad_generated_image_file_is_named(tiny_clevr, tmp_path, damage, message):
    source = tmp_path / "clevr"
    shutil.copytree(tiny_clevr, source, ignore=shutil.ignore_patterns("prepared"))
    damage(source / "images" / "val.h5")
    with pytest.raises(data.DataError) as e:
        prepare.prepare_clevr(source, tmp_path / "out", size=32, **QUIET)
    assert str(e.value).startswith(f"{source / 'images' / 'val.h5'}: ") and message in str(e.value)
    assert str(e.value).endswith("generate the folder again (python prepare.py generate)")


def test_an_unreadable_png_is_named(tmp_path, monkeypatch):
    class Image:  # Pillow's part that read_rgb uses, failing as on a damaged file
        @staticmethod
        def open(path):
            raise OSError(f"cannot identify image file {str(path)!r}")
    monkeypatch.setitem(sys.modules, "PIL", types.SimpleNamespace(Image=Image))
    png = tmp_path / "CLEVR_train_000000.png"
    png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(data.DataError, match=rf"^{png}: not a readable image \(OSError: cannot identify image file"):
        prepare.read_rgb(png)
