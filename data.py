"""What models and train.py read: CLEVR's formats and vocabulary, programs, a symbolic executor, checks
of every file where it is read, the prepared datasets and their batch loader, the built-in mini-CLEVR's
cache, and reading train.py's checkpoints (for train.py and the analysis tools).

Writing data lives elsewhere: mini_clevr.py generates the built-in mini-CLEVR, prepare.py prepares
folders (`python prepare.py generate|clevr|features|humans|gqa`). `python data.py generate|prepare|
features|humans|gqa` still works: it forwards to prepare.py (`prepare` is `clevr` there).

CLEVR: Johnson et al., "CLEVR: A Diagnostic Dataset for Compositional Language and Elementary
Visual Reasoning", CVPR 2017 (facebookresearch/clevr-dataset-gen). The preprocessed format follows
facebookresearch/clevr-iep (vocab.json; questions h5 with prefix programs).

Layout of a prepared data directory (what `train.py --data DIR` reads):
    vocab.json                {question,program,answer}_token_to_idx, specials 0..3
    info.json                 image kind, the image file of each split, the hash of vocab.json it was made with
    {split}_questions.h5      questions (N, Lq) int32, programs (N, Lp) int32 prefix, image_idxs,
                              orig_idxs, question_families, answers (N,) int64
    {split}_images.h5         images (N, 3, S, S) uint8         (--images pixels)
    or any feature h5         features|data (N, 1024, 14, 14)  (--images features)
    or {split}_features.h5    (N, 18, S/8, S/8) float16        (--images scene-cnn, the built-in default)
    or objects.h5             features (N, 100, 2048), boxes (N, 100, 4), num_objects (N,)  (GQA)

A batch is a dict of tensors: image (B, C, H, W) float, question (B, Lq) long padded with 0,
question_len (B,), program (B, Lp) prefix tokens, answer (B,) (-100 where unknown), family (B,),
kind (B,) index into QUESTION_KINDS (-1 unknown), image_index (B,). With object features (GQA) image
is (B, O, F), plus boxes (B, O, 4) and num_objects (B,).
"""
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# CLEVR's vocabulary of attributes, functions and question kinds
# ------------------------------------------------------------------------------------------------

ATTRIBUTES = {  # the values of CLEVR's four attributes (clevr-dataset-gen properties.json)
    "size": ("large", "small"),
    "color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
    "material": ("rubber", "metal"),
    "shape": ("cube", "sphere", "cylinder"),
}
ATTR_ORDER = ("size", "color", "material", "shape")  # the order of words in a noun phrase
RELATIONS = ("left", "right", "front", "behind")
QUESTION_KINDS = ("Count", "Exist", "Compare Number", "Query Attribute", "Compare Attribute")
SPECIALS = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}
NULL, START, END, UNK = 0, 1, 2, 3


class DataError(Exception):
    """A problem with the user's data; the message says what is wrong and what to do."""


def first_line(e, limit=200):
    """An exception in one line of an error message: its type and the first non-empty line of its text
    (torch and h5py write several lines; an EOFError from an empty file writes none)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def question_kind(root_function):
    """The results-table column of a question: the root function of its program."""
    if root_function == "count":
        return "Count"
    if root_function == "exist":
        return "Exist"
    if root_function in ("equal_integer", "less_than", "greater_than"):
        return "Compare Number"
    if root_function.startswith("query_"):
        return "Query Attribute"
    if root_function.startswith("equal_"):
        return "Compare Attribute"
    return None


# ------------------------------------------------------------------------------------------------
# Programs: CLEVR node lists (post-order, root last) <-> clevr-iep prefix tokens <-> trees
# ------------------------------------------------------------------------------------------------

def normalize_node(node):
    """One program node in the release's spelling (`function`, `inputs`, `value_inputs`);
    the question generator's `type` / `side_inputs` are accepted too."""
    fn = node.get("function", node.get("type"))
    if fn is None:
        raise DataError(f"program node {node} has neither 'function' nor 'type'")
    values = node.get("value_inputs", node.get("side_inputs", []))
    return {"function": fn, "inputs": list(node.get("inputs", [])), "value_inputs": list(values)}


FUNCTIONS = ({"scene", "unique", "relate", "union", "intersect", "count", "exist", "equal_integer", "less_than",
              "greater_than"} | {f"{p}_{a}" for p in ("filter", "query", "same", "equal") for a in ATTR_ORDER})
MAX_PROGRAM_NODES = 200  # CLEVR's programs have a few dozen nodes at most; the bound stops hostile recursion


def _short(x):
    return repr(x)[:60] + ("..." if len(repr(x)) > 60 else "")


def check_program(program):
    """`program` itself if it is a CLEVR program (post-order node list, root last), or a DataError that
    says what is wrong: each node a dict with one of CLEVR's FUNCTIONS, inputs that are earlier nodes,
    as many as the function takes, one string value for filter_* and relate, none for the rest."""
    if not isinstance(program, list) or not program:
        raise DataError(f"a program is a non-empty list of nodes, not {_short(program)}")
    size = []  # nodes of the tree that each node roots, once shared inputs are copied
    for i, node in enumerate(program):
        if not isinstance(node, dict):
            raise DataError(f"program node {i} is {_short(node)}, not an object")
        fn = node.get("function", node.get("type"))
        if not isinstance(fn, str) or fn not in FUNCTIONS:
            raise DataError(f"program node {i}: unknown function {_short(fn)} (CLEVR's: {', '.join(sorted(FUNCTIONS))})")
        inputs, values = node.get("inputs", []), node.get("value_inputs", node.get("side_inputs", []))
        if not isinstance(inputs, list) or not all(type(j) is int and 0 <= j < i for j in inputs):
            raise DataError(f"program node {i} ({fn}): inputs {_short(inputs)} are not indices of earlier nodes")
        if len(inputs) != arity(fn):
            raise DataError(f"program node {i} ({fn}) has {len(inputs)} inputs; {fn} takes {arity(fn)}")
        want = int(fn.startswith("filter_") or fn == "relate")
        if not isinstance(values, list) or len(values) != want or not all(isinstance(v, str) for v in values):
            raise DataError(f"program node {i} ({fn}): value_inputs {_short(values)}; {fn} takes {want} string(s)")
        size.append(1 + sum(size[j] for j in inputs))
        if size[-1] > MAX_PROGRAM_NODES:
            raise DataError(f"program node {i} ({fn}) roots a tree of more than {MAX_PROGRAM_NODES} nodes")
    return program


def node_token(node):
    """clevr-iep's program token: the function fused with its value, e.g. `filter_color[red]`."""
    node = normalize_node(node)
    return f"{node['function']}[{node['value_inputs'][0]}]" if node["value_inputs"] else node["function"]


def token_function(token):
    """`filter_color[red]` -> `filter_color`."""
    return token.split("[", 1)[0]


def arity(token):
    """Number of children of a program token (clevr-iep's rule)."""
    fn = token_function(token)
    if fn == "scene":
        return 0
    if "equal" in fn or fn in ("union", "intersect", "less_than", "greater_than"):
        return 2
    return 1


def list_to_tree(program):
    """Post-order node list (root last) -> nested {'token', 'children'} tree."""
    nodes = [normalize_node(n) for n in check_program(program)]

    def build(i):
        return {"token": node_token(nodes[i]), "children": [build(j) for j in nodes[i]["inputs"]]}
    return build(len(nodes) - 1)


def tree_to_prefix(tree):
    """Tree -> prefix token list (root first, children left to right)."""
    out = [tree["token"]]
    for child in tree["children"]:
        out += tree_to_prefix(child)
    return out


def prefix_to_tree(tokens):
    """Prefix token list -> tree, reading `arity(token)` children per token."""
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(tokens) > MAX_PROGRAM_NODES:
        raise DataError(f"a prefix program is a list of at most {MAX_PROGRAM_NODES} strings, not {_short(tokens)}")
    pos = 0

    def build():
        nonlocal pos
        if pos >= len(tokens):
            raise DataError(f"prefix program ends early: {tokens}")
        token = tokens[pos]
        pos += 1
        return {"token": token, "children": [build() for _ in range(arity(token))]}
    tree = build()
    if pos != len(tokens):
        raise DataError(f"prefix program has {len(tokens) - pos} tokens after its root's subtree: {tokens}")
    return tree


def tree_to_list(tree):
    """Tree -> post-order node list in the release's spelling (root last)."""
    nodes = []

    def visit(t):
        inputs = [visit(c) for c in t["children"]]
        fn, _, value = t["token"].partition("[")
        nodes.append({"function": fn, "inputs": inputs, "value_inputs": [value[:-1]] if value else []})
        return len(nodes) - 1
    visit(tree)
    return nodes


def list_to_prefix(program):
    return tree_to_prefix(list_to_tree(program))


def prefix_to_list(tokens):
    return tree_to_list(prefix_to_tree(tokens))


def node_heights(tokens):
    """Height of every node of a prefix program: 0 for leaves, 1 + max child height otherwise.
    Nodes with equal height never depend on each other (the topological executor's schedule)."""
    heights = [0] * len(tokens)
    pos = 0

    def visit():
        nonlocal pos
        me = pos
        pos += 1
        kids = [visit() for _ in range(arity(tokens[me]))]
        heights[me] = 1 + max(kids) if kids else 0
        return heights[me]
    visit()
    return heights


# ------------------------------------------------------------------------------------------------
# Symbolic executor: answers a CLEVR program on a CLEVR scene
# ------------------------------------------------------------------------------------------------

class IllPosed(Exception):
    """The program has no single answer on this scene (e.g. `unique` on 0 or 2+ objects)."""


def execute(program, scene):
    """Run a CLEVR program (node list, root last) on a scene dict; returns the answer string.
    Sets of objects are frozensets of indices; `unique` raises IllPosed unless exactly one."""
    objs, rels = scene["objects"], scene["relationships"]
    vals = []
    for node in map(normalize_node, program):
        fn, args = node["function"], [vals[i] for i in node["inputs"]]
        value = node["value_inputs"][0] if node["value_inputs"] else None
        kind, _, attr = fn.partition("_")
        if fn == "scene":
            out = frozenset(range(len(objs)))
        elif kind == "filter":
            out = frozenset(i for i in args[0] if objs[i][attr] == value)
        elif fn == "unique":
            if len(args[0]) != 1:
                raise IllPosed(f"unique on {len(args[0])} objects")
            out = next(iter(args[0]))
        elif fn == "relate":
            out = frozenset(rels[value][args[0]])
        elif kind == "same":
            me = args[0]
            out = frozenset(j for j in range(len(objs)) if j != me and objs[j][attr] == objs[me][attr])
        elif fn == "union":
            out = args[0] | args[1]
        elif fn == "intersect":
            out = args[0] & args[1]
        elif fn == "count":
            out = len(args[0])
        elif fn == "exist":
            out = len(args[0]) > 0
        elif kind == "query":
            out = objs[args[0]][attr]
        elif kind == "equal":  # equal_{color,shape,size,material,integer}
            out = args[0] == args[1]
        elif fn == "less_than":
            out = args[0] < args[1]
        elif fn == "greater_than":
            out = args[0] > args[1]
        else:
            raise DataError(f"unknown program function {fn!r}")
        vals.append(out)
    answer = vals[-1]
    if isinstance(answer, bool):
        return "yes" if answer else "no"
    return str(answer)



# ------------------------------------------------------------------------------------------------
# clevr-iep's vocabulary: tokenizer, vocab.json
# ------------------------------------------------------------------------------------------------

def tokenize(text):
    """clevr-iep's tokenizer: lowercase, drop `?` and `.`, keep `;` and `,` as tokens."""
    text = text.lower().replace("?", "").replace(".", "")
    for p in ";,":
        text = text.replace(p, f" {p} ")
    return text.split()


def vocab_hash(vocab):
    return hashlib.sha1(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:12]


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-download or regenerate this file") from None


# ------------------------------------------------------------------------------------------------
# Hostile inputs: every file is checked where it is read, so that a bad one gives one message that
# names it and the fix, never a stack trace from deep inside (JSON is parsed, never executed; h5 holds
# arrays, never pickles)
# ------------------------------------------------------------------------------------------------

MAX_IMAGES = 10 ** 7  # CLEVR has 100,000 images; an image_index beyond this is a damaged file


def check_features(path, num_images=None, shape=(1024, 14, 14)):
    """Validate a feature h5 (dataset `features` or `data`, (N, *shape) float; by default ResNet-101
    layer3 features (N, 1024, 14, 14)); returns the dataset's name."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such feature file; extract features first or pass --images pixels")
    want = f"float (N, {', '.join(map(str, shape))})" + (" ResNet-101 layer3 features" if shape[0] == 1024 else "")
    try:
        with h5py.File(path, "r") as f:
            name = "features" if "features" in f else "data" if "data" in f else None
            if name is None:
                raise DataError(f"{path}: no dataset 'features' or 'data' (found {list(f.keys())}); expected {want}")
            found, dtype = f[name].shape, f[name].dtype
    except OSError as e:
        raise DataError(f"{path}: not a readable h5 file ({e})") from None
    if tuple(found[1:]) != tuple(shape) or dtype.kind != "f":
        raise DataError(f"{path}: dataset {name!r} has shape {found} and dtype {dtype}; expected {want}")
    if num_images is not None and found[0] < num_images:
        raise DataError(f"{path}: {found[0]} feature rows but the questions refer to {num_images} images; "
                        f"were the features extracted from another split?")
    return name


def check_questions(questions, path):
    """`questions` (the list of a CLEVR questions JSON) if each has what prepare.py needs, else a DataError."""
    if not questions:
        raise DataError(f"{path}: the 'questions' list is empty")
    for i, q in enumerate(questions):
        try:
            if not isinstance(q, dict):
                raise DataError(f"is {_short(q)}, not an object")
            if not isinstance(q.get("question"), str):
                raise DataError(f"'question' is {_short(q.get('question'))}, not a string")
            if type(q.get("image_index")) is not int or not 0 <= q["image_index"] < MAX_IMAGES:
                raise DataError(f"'image_index' is {_short(q.get('image_index'))}, not an image number")
            if "answer" in q and not isinstance(q["answer"], str):
                raise DataError(f"'answer' is {_short(q['answer'])}, not a string")
            for key in ("question_family_index", "question_index"):
                if key in q and (type(q[key]) is not int or not -1 <= q[key] < 2 ** 62):
                    raise DataError(f"{key!r} is {_short(q[key])}, not an integer")
            if "program" in q:
                check_program(q["program"])
        except DataError as e:
            raise DataError(f"{path}: question {i}: {e}; fix or remove this question") from None
    check_all_or_none(questions, ("answer", "program"), lambda i: f"{path}: question {i}")
    return questions


def check_all_or_none(questions, keys, where):
    """A DataError unless each of `keys` is in every question or in none: a split without answers (as
    CLEVR's test split) is fine, but one question without its answer would drop the answers of the whole
    split. where(i) names question i (`FILE: question i`)."""
    for key in keys:
        missing = [i for i, q in enumerate(questions) if key not in q]
        if 0 < len(missing) < len(questions):
            raise DataError(f"{where(missing[0])} has no {key!r}, but {len(questions) - len(missing)} of the "
                            f"{len(questions)} questions have one; a split has {key}s in every question or in none: "
                            f"add the {key} to the {len(missing)} questions without, or remove them")


def check_finite(x, path, rows=None):
    """A DataError naming `path` and the row if feature rows `x` (in memory; `rows`: their row numbers in
    the file, default 0, 1, ...) hold NaN or inf, which would make every loss NaN. In chunks of rows, so
    that a large x needs little more memory."""
    if x.dtype.kind != "f":
        return
    for start in range(0, len(x), 1024):
        chunk = x[start:start + 1024]
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(1)
        if not finite.all():
            i = start + int(np.argmin(finite))
            row = int(rows[i]) if rows is not None else i
            bad = "NaN" if np.isnan(x[i]).any() else "inf"
            raise DataError(f"{path}: feature row {row} (image {row}) holds {bad}; the file is damaged or the network "
                            "that made it diverged: extract or prepare the features again")


def load_vocab(path):
    """A clevr-iep vocab.json: {question,program,answer}_token_to_idx, each token -> 0..n-1."""
    vocab = load_json(path, "vocabulary")
    for key in ("question_token_to_idx", "program_token_to_idx", "answer_token_to_idx"):
        to_idx = vocab.get(key) if isinstance(vocab, dict) else None
        if not isinstance(to_idx, dict) or sorted(v for v in to_idx.values() if type(v) is int) != list(range(len(to_idx))):
            raise DataError(f"{path}: {key} is missing or does not number its tokens 0..n-1; this is not a "
                            "vocab.json written by `python prepare.py clevr`: prepare the data again")
    return vocab


def _read_info(path):
    info = load_json(path, "data info")
    if (not isinstance(info, dict) or info.get("image_kind") not in ("pixels", "features", "objects")
            or not isinstance(info.get("images"), dict) or not info["images"]
            or not all(isinstance(v, str) for v in info["images"].values())):
        raise DataError(f"{path}: expected image_kind pixels|features|objects and images {{split: file}}, as written by "
                        "`python prepare.py clevr`: prepare the data again")
    return info


def _open_h5(path, what):
    if not Path(path).exists():
        raise DataError(f"{path}: no such file ({what}); prepare the data again")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable h5 file ({e}); prepare the data again") from None


def check_images(path):
    """Validate a pixels h5 (dataset `images`, (N, 3, H, W) uint8); returns the dataset's name."""
    with _open_h5(path, "images") as f:
        if "images" not in f or f["images"].ndim != 4 or f["images"].shape[1] != 3 or f["images"].dtype != np.uint8:
            found = f"{f['images'].shape} {f['images'].dtype}" if "images" in f else f"datasets {list(f.keys())}"
            raise DataError(f"{path}: expected a dataset 'images' (N, 3, H, W) uint8, found {found}; "
                            "run `python prepare.py clevr ... --images pixels` again")
    return "images"


def _read_questions_h5(path, vocab):
    """The arrays of a clevr-iep questions h5 as int64, after checking shapes, dtypes and index ranges."""
    want = {"questions": (2, "question_token_to_idx"), "image_idxs": (1, None), "question_families": (1, None),
            "programs": (2, "program_token_to_idx"), "answers": (1, "answer_token_to_idx")}
    out = {}
    with _open_h5(path, "questions") as f:
        for name, (ndim, vocab_key) in want.items():
            if name not in f:
                if name in ("programs", "answers"):  # the test split has neither
                    continue
                raise DataError(f"{path}: no dataset {name!r} (found {list(f.keys())}); prepare the data again")
            d = f[name]
            if not isinstance(d, h5py.Dataset) or d.ndim != ndim or d.dtype.kind not in "iu":
                raise DataError(f"{path}: dataset {name!r} is {getattr(d, 'shape', '?')} {getattr(d, 'dtype', '?')}; "
                                f"expected {ndim}-D integers as written by `python prepare.py clevr`: "
                                "prepare the data again")
            a = d[:].astype(np.int64)
            top = len(vocab[vocab_key]) if vocab_key else MAX_IMAGES
            if a.size and (a.min() < (-1 if name == "question_families" else 0) or a.max() >= top):
                raise DataError(f"{path}: {name!r} holds values from {a.min()} to {a.max()}, outside 0..{top - 1}"
                                + ("; was it prepared with another vocab.json?" if vocab_key else ""))
            out[name] = a
    if len({len(a) for a in out.values()}) > 1:
        raise DataError(f"{path}: its datasets have different lengths "
                        f"({', '.join(f'{k} {len(a)}' for k, a in out.items())}); prepare the data again")
    if not len(out["questions"]):
        raise DataError(f"{path}: no questions; prepare the data again from a questions file that has some")
    empty = ~(out["questions"] != NULL).any(1)
    if empty.any():  # a question of padding alone
        raise DataError(f"{path}: question row {int(np.argmax(empty))} has no tokens (padding alone); "
                        "prepare the data again")
    return out


# ------------------------------------------------------------------------------------------------
# Reading a prepared directory: info, datasets, the loader
# ------------------------------------------------------------------------------------------------

def resolve(data_dir):
    """The prepared directory behind `data_dir` (a generated folder holds it in prepared/)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"{data_dir}: no such data directory; omit --data to use the built-in "
                        f"mini-CLEVR, or run `python prepare.py clevr CLEVR_DIR --out {data_dir}`")
    for d in (data_dir, data_dir / "prepared"):
        if (d / "vocab.json").exists() and (d / "info.json").exists():
            return d
    hint = (f"it looks like a CLEVR folder: run `python prepare.py clevr {data_dir} --out {data_dir}/prepared`"
            if (data_dir / "questions").is_dir()
            else "expected vocab.json and info.json from `python prepare.py clevr`")
    if (data_dir / "features" / "objects").is_dir():
        hint = f"it looks like a GQA folder: run `python prepare.py gqa {data_dir}`"
    raise DataError(f"{data_dir}: not a prepared data directory; {hint}")


def load_prepared(d):
    """(vocab, info) of prepared directory `d`, checked: a vocab.json that is not the one the data was
    prepared with (the hash info.json records; older directories record none) is refused."""
    vocab, info = load_vocab(d / "vocab.json"), _read_info(d / "info.json")
    if "vocab_hash" in info and info["vocab_hash"] != vocab_hash(vocab):
        raise DataError(f"{d / 'vocab.json'} is vocabulary {vocab_hash(vocab)}, but the data was prepared with "
                        f"vocabulary {info['vocab_hash']} (info.json): its word and answer indices would be wrong. "
                        "Put back the vocab.json written with the data, or prepare the data again")
    return vocab, info


def load_info(data_dir):
    """What a model needs to know about the data: vocab sizes, the image kind and shape."""
    d = resolve(data_dir)
    vocab, info = load_prepared(d)
    split = "train" if "train" in info["images"] else next(iter(info["images"]))
    path = d / info["images"][split]
    if info["image_kind"] in ("features", "objects"):
        name = check_features(path, shape=info.get("feature_shape", (1024, 14, 14)))
    else:
        name = check_images(path)
    with h5py.File(path, "r") as f:
        shape = tuple(f[name].shape[1:])
    answers = sorted(vocab["answer_token_to_idx"], key=vocab["answer_token_to_idx"].get)
    return {"num_words": len(vocab["question_token_to_idx"]), "num_answers": len(answers),
            "num_program_tokens": len(vocab["program_token_to_idx"]),
            "program_tokens": sorted(vocab["program_token_to_idx"], key=vocab["program_token_to_idx"].get),
            "image_kind": info["image_kind"],
            "image_shape": shape, "vocab_hash": vocab_hash(vocab), "answers": answers,
            "splits": list(info["images"]), "data_dir": str(d), "dataset": info.get("dataset", "CLEVR")}


def _rows(dset, idx):
    """dset[idx] for an array or an h5 dataset (which wants increasing, unique indices)."""
    if isinstance(dset, np.ndarray):
        return dset[idx]
    uniq, inverse = np.unique(idx, return_inverse=True)
    return dset[uniq][inverse]


class Split:
    """The questions of one split in memory, and its images: in memory when small (the built-in
    data), read per batch from h5 otherwise (real CLEVR features are ~60 GB)."""

    def __init__(self, data_dir, split, max_memory=2 << 30):
        d = resolve(data_dir)
        vocab, info = load_prepared(d)
        if split not in info["images"]:
            raise DataError(f"{d}: no {split} split (has {', '.join(info['images'])})")
        q = _read_questions_h5(d / f"{split}_questions.h5", vocab)
        self.questions, self.image_idxs, self.families = q["questions"], q["image_idxs"], q["question_families"]
        n = len(self.questions)
        self.programs = q["programs"] if "programs" in q else np.zeros((n, 1), np.int64)
        self.answers = q["answers"] if "answers" in q else np.full(n, -100, np.int64)
        self.lengths = (self.questions != NULL).sum(1)
        kind_of = {i: QUESTION_KINDS.index(question_kind(token_function(t)))
                   if question_kind(token_function(t)) else -1 for t, i in vocab["program_token_to_idx"].items()}
        root = self.programs[:, 1] if self.programs.shape[1] > 1 else np.zeros(n, np.int64)
        self.kinds = np.array([kind_of.get(int(t), -1) for t in root], dtype=np.int64)
        path = d / info["images"][split]
        self.is_pixels = info["image_kind"] == "pixels"
        name = check_images(path) if self.is_pixels else check_features(path, shape=info.get("feature_shape", (1024, 14, 14)))
        self.file = h5py.File(path, "r")
        self.images = self.file[name]
        if len(self.image_idxs) and self.image_idxs.max() >= len(self.images):
            raise DataError(f"{path}: {len(self.images)} images, but questions refer to image "
                            f"{self.image_idxs.max()}; the image file belongs to another split or dataset")
        self.path = path
        if self.images.size * self.images.dtype.itemsize <= max_memory:
            self.images = self.images[:]
            check_finite(self.images, path)  # once here; rows read from h5 are checked per batch
        self.objects = None  # GQA: boxes (N, O, 4) read per batch, num_objects (N,) in memory
        if info["image_kind"] == "objects":
            self.objects = {"boxes": self.file["boxes"], "num_objects": self.file["num_objects"][:]}

    def __len__(self):
        return len(self.questions)

    def batch(self, idx):
        """The batch dict for question rows `idx`."""
        img_idx = self.image_idxs[idx]
        rows = _rows(self.images, img_idx)
        if not isinstance(self.images, np.ndarray):
            check_finite(rows, self.path, img_idx)
        image = torch.from_numpy(rows)
        image = image.float().div_(255) if self.is_pixels else image.float()
        L = max(int(self.lengths[idx].max()), 1)
        prog = self.programs[idx]
        P = max(int((prog != NULL).sum(1).max()), 1)
        t = torch.from_numpy
        out = {"image": image, "question": t(self.questions[idx, :L]), "question_len": t(self.lengths[idx]),
               "program": t(prog[:, :P]), "answer": t(self.answers[idx]), "family": t(self.families[idx]),
               "kind": t(self.kinds[idx]), "image_index": t(img_idx)}
        if self.objects is not None:
            out.update({k: t(_rows(v, img_idx)) for k, v in self.objects.items()})
        return out


class Loader:
    """Batches of a Split. The shuffled order is a function of (seed, epoch) alone, and `start`
    skips the batches already done, so a resumed run sees exactly the batches it would have.
    Distributed (`world` processes): process `rank` reads rows rank, rank + world, ... of every global
    batch, so the processes together see the single-process batches, each question exactly once.

    `rows` (an int array, or None for all) restricts it to those rows of the split."""

    def __init__(self, split, batch_size, shuffle, seed=0, drop_last=False, rank=0, world=1):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.drop_last = drop_last and len(split) >= batch_size  # a split smaller than a batch still yields it
        self.epoch, self.start, self.rows = 0, 0, None
        self.rank, self.world = rank, world

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.batches(len(self.split) if self.rows is None else len(self.rows))

    def batches(self, n):
        """How many batches n rows make."""
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.split) if self.rows is None else len(self.rows)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n))
        order = order if self.rows is None else np.asarray(self.rows)[order]
        for b in range(self.start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]
            if len(idx):  # a last batch smaller than `world` leaves some processes without rows
                yield self.split.batch(idx)


def make_loader(data_dir, split, batch_size, shuffle, seed=0, drop_last=False, rank=0, world=1):
    return Loader(Split(data_dir, split), batch_size, shuffle, seed, drop_last, rank, world)


def builtin_dir(tiny=False):
    """The built-in mini-CLEVR's cache folder, named after the generator's version."""
    from mini_clevr import GENERATOR_VERSION  # the generator is a tool: imported when used, never with data.py
    root = Path(os.environ.get("MINI_CLEVR_CACHE", Path.home() / ".cache" / "mini-clevr")).expanduser()
    return root / f"{'tiny' if tiny else 'default'}-v{GENERATOR_VERSION}"


def _running(pid):
    """Whether process `pid` runs on this machine (where that cannot be asked, assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only checked
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def remove_stale(final):
    """Delete the temporary folders beside `final` (`final`.tmp-HOST-PID, or the older `final`.tmp-PID)
    that a killed process left: those of this host whose PID no longer runs. A folder of a process that
    runs, here or on another host sharing the disk, is kept."""
    final, host = Path(final), socket.gethostname()
    for old in final.parent.glob(glob.escape(final.name) + ".tmp-*"):
        owner, _, pid = old.name[len(final.name) + len(".tmp-"):].rpartition("-")
        if pid.isdigit() and owner in ("", host) and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def staging_dir(final):
    """The name of a temporary folder beside `final`, to fill and then rename to `final`: `final`.tmp-HOST-PID,
    not there yet. Stale ones (remove_stale) are deleted first."""
    final = Path(final)
    remove_stale(final)
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def ensure_builtin(tiny=False, log=print):
    """The prepared built-in mini-CLEVR, generated on first use into a cache folder
    ($MINI_CLEVR_CACHE or ~/.cache/mini-clevr) and reused. Generated in a temporary folder
    and renamed when complete, so an interrupted generation never leaves half a dataset (and the
    temporary folder of a killed one is deleted on the next use)."""
    final = builtin_dir(tiny)
    remove_stale(final)
    if (final / "prepared" / "info.json").exists():
        return final / "prepared"
    import mini_clevr  # the generator and prepare.py are imported on first use only: data.py, and every
    import prepare  # model that imports it, loads without them
    log(f"generating the built-in mini-CLEVR{' (tiny)' if tiny else ''} into {final} (first use only)")
    tmp = staging_dir(final)
    try:
        mini_clevr.generate(tmp, tiny=tiny, log=log)
        size = mini_clevr.BUILTIN["tiny" if tiny else "default"]["image_size"]
        prepare.prepare_clevr(tmp, tmp / "prepared", images="scene-cnn", size=size, log=log)
    except BaseException:  # an error or Ctrl-C: nothing half-made stays in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = tmp / "prepared" / "info.json"
    info.write_text(info.read_text().replace(str(tmp.resolve()), str(final.resolve())))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "prepared"


# ------------------------------------------------------------------------------------------------
# Checkpoints: train.py writes them; it and the tools (analyze.py, bench.py) read them here, the one
# module they may all import
# ------------------------------------------------------------------------------------------------

CKPT_KEYS = {"model_name", "wrapper_name", "prefix", "config", "model", "ema", "optimizer", "scheduler", "epoch",
             "iter", "pos", "best_acc", "rng", "vocab_hash"}


def tensor_digest(obj):
    """sha1 of every tensor in a checkpoint, in order. torch.load does not notice damaged tensor bytes (they
    are >99% of the file), so the digest is stored in the checkpoint and checked when it is read."""
    h = hashlib.sha1()

    def visit(x):
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
    visit(obj)
    return h.hexdigest()


def _weights_only_refusal(e):
    """torch's own reason for a refused weights_only load (e.g. `Unsupported global: GLOBAL
    argparse.Namespace was not an allowed global by default.`), without the advice around it on
    loading with weights_only=False; None for any other error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch sets part of its advice in bold
    if not text.startswith("Weights only load failed"):
        return None
    advice = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith(advice)]
    reason = lines[-1].removeprefix("WeightsUnpickler error:").strip() if lines else ""
    return reason.split(" Please use ")[0][:300] or None


def read_checkpoint(path, models=(), hint=""):
    """The checkpoint train.py wrote at `path` (a run directory stands for its best.pt), or a DataError
    that says what is wrong: no such file, a damaged file, not train.py's, or a model not in `models`.
    `hint` is added to the messages about a damaged file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise DataError(f"{path} is a directory without a best.pt: pass a checkpoint file (RUN/best.pt or RUN/last.pt)")
        path = path / "best.pt"
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}: pass a run directory of train.py or its best.pt / last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, not a torch file, pickled Python objects, ...
        refused = _weights_only_refusal(e)
        if refused and "GLOBAL" in refused:  # a class or a callable: never run, torch stops at its name
            raise DataError(f"cannot read checkpoint {path}: it holds Python objects that weights_only loading "
                            f"refuses ({refused}); nothing in it was run. train.py's checkpoints hold tensors, "
                            f"numbers and strings only: pass a checkpoint that train.py wrote{hint}") from None
        why = f"{type(e).__name__}: {refused}" if refused else first_line(e)
        empty = ", an empty file (0 bytes)" if path.stat().st_size == 0 else ""
        raise DataError(f"cannot read checkpoint {path} ({why}{empty}); the file is damaged or not a checkpoint"
                        f"{hint}") from None
    if isinstance(ckpt, dict) and "digest" in ckpt and ckpt.pop("digest") != tensor_digest(ckpt):
        raise DataError(f"checkpoint {path} is damaged: its tensors do not match the checksum written with them "
                        f"(a disk or copy error){hint}")
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
        raise DataError(f"{path} is not a checkpoint written by train.py (it lacks "
                        f"{sorted(CKPT_KEYS - set(ckpt)) if isinstance(ckpt, dict) else 'everything'}){hint}")
    if models and ckpt["model_name"] not in models:
        want = " or ".join(f"'{m}'" for m in models)
        raise DataError(f"checkpoint {path} holds a '{ckpt['model_name']}' model, not {want}: pick a checkpoint of "
                        f"{want} (this one runs with `python train.py {ckpt['model_name']} ...`)")
    return ckpt


def checkpoint_config(cls, saved):
    """The config dataclass `cls` with the values a checkpoint saved (lists back to tuples); a field the
    code no longer has is dropped, a field it gained keeps its default."""
    default = cls()
    values = {k: tuple(v) if isinstance(getattr(default, k), tuple) else v
              for k, v in (saved or {}).items() if hasattr(default, k)}
    return dataclasses.replace(default, **values)


def checkpoint_data(ckpt, data_dir=None):
    """(prepared data directory, load_info) to run a checkpoint on: `data_dir`, else the one it was trained
    on (the built-in data is made again if its cache is gone; other data must still be there); a DataError
    if that data is gone or its vocabulary is not the checkpoint's."""
    if data_dir is None:
        saved = ckpt.get("data_dir")
        builtin = [builtin_dir(tiny) for tiny in (False, True)]
        if not saved or Path(saved).exists():
            data_dir = saved or ensure_builtin()
        elif any(Path(saved).is_relative_to(b) for b in builtin):
            data_dir = ensure_builtin(tiny=Path(saved).is_relative_to(builtin[1]))
        else:
            raise DataError(f"the checkpoint was trained on {saved}, which is not there (a path relative to the "
                            "folder the run started in, or data moved since): pass --data DIR")
    data_dir = resolve(data_dir)
    info = load_info(data_dir)
    if info["vocab_hash"] != ckpt["vocab_hash"]:
        raise DataError(f"the checkpoint was trained on data with vocabulary {ckpt['vocab_hash']} "
                        f"({ckpt.get('data_dir', '?')}), but {data_dir} has vocabulary {info['vocab_hash']}: "
                        "word and answer indices would not match. Pass the --data it was trained on")
    return data_dir, info


def dataset_name(data_dir):
    """'GQA', 'CLEVR-Humans' or 'CLEVR' (the default, mini-CLEVR included): what info.json says."""
    return load_json(resolve(data_dir) / "info.json", "data info").get("dataset", "CLEVR")



if __name__ == "__main__":  # the preparation commands live in prepare.py; the old spelling still works
    import prepare
    argv = sys.argv[1:]
    prepare.main(["clevr", *argv[1:]] if argv[:1] == ["prepare"] else argv)
