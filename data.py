"""Everything about data: CLEVR's formats, programs, a symbolic executor, the built-in mini-CLEVR
generator, clevr-iep style preprocessing, the batch loader that every model reads from, and reading
train.py's checkpoints (for train.py and the analysis tools).

    python data.py generate [--out DIR] [--tiny]          # built-in mini-CLEVR, CLEVR layout + prepared/
    python data.py prepare CLEVR_DIR --out DIR [--images pixels|features] [--size N]
    python data.py features CLEVR_DIR --out DIR [--float16] [--clevr-iep-std]   # ResNet-101 layer3, resumable
    python data.py humans HUMANS_DIR --clevr PREPARED_CLEVR --out DIR      # CLEVR-Humans on CLEVR's vocab
    python data.py gqa GQA_DIR [--variant balanced|all]                    # GQA -> GQA_DIR/prepared

CLEVR: Johnson et al., "CLEVR: A Diagnostic Dataset for Compositional Language and Elementary
Visual Reasoning", CVPR 2017 (facebookresearch/clevr-dataset-gen). The preprocessed format follows
facebookresearch/clevr-iep (vocab.json; questions h5 with prefix programs).

Layout of a prepared data directory (what `train.py --data DIR` reads):
    vocab.json                {question,program,answer}_token_to_idx, specials 0..3
    info.json                 image kind and the image file of each split
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
import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zlib
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
# The built-in mini-CLEVR: 2-D scenes with CLEVR's attributes, drawn with numpy
# ------------------------------------------------------------------------------------------------

GENERATOR_VERSION = 3  # bumped whenever the built-in data changes (3: scene-CNN predictions as features)
BUILTIN = {  # sizes of the two built-in datasets
    "default": dict(train_images=5000, val_images=500, questions_per_image=20, image_size=48, max_objects=5),
    "tiny": dict(train_images=48, val_images=16, questions_per_image=5, image_size=32, max_objects=5),
}
RGB = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
       "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208),
       "yellow": (255, 238, 51)}  # CLEVR's own colors (clevr-dataset-gen properties.json)
RADIUS = {"large": 0.11, "small": 0.07}  # object radius as a fraction of the image side
MARGIN = 0.04  # every pair of objects differs by this much in x and in y, so relations are unambiguous


def sample_scene(rng, index, split, size, min_objects=3, max_objects=5):
    """A random scene in CLEVR's scene format. Objects do not overlap, and every pair is at least
    MARGIN apart both horizontally and vertically, so left/right/front/behind are never ambiguous.
    The camera looks down the floor: 'behind' is higher in the picture, 'front' lower."""
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        objects = []
        for _ in range(50 * n):
            obj = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
            r = RADIUS[obj["size"]] * size
            x, y = rng.uniform(r + 0.03 * size, size - r - 0.03 * size, 2)
            if all(abs(x - o["x"]) >= MARGIN * size and abs(y - o["y"]) >= MARGIN * size
                   and np.hypot(x - o["x"], y - o["y"]) >= r + o["r"] + 0.02 * size for o in objects):
                objects.append(dict(obj, x=x, y=y, r=r))
                if len(objects) == n:
                    break
        if len(objects) == n:
            break
    rels = {rel: [[j for j, b in enumerate(objects) if j != i and {
        "left": b["x"] < a["x"], "right": b["x"] > a["x"],
        "front": b["y"] > a["y"], "behind": b["y"] < a["y"]}[rel]] for i, a in enumerate(objects)]
        for rel in RELATIONS}
    return {
        "split": split, "image_index": index, "image_filename": f"CLEVR_{split}_{index:06d}.png",
        "objects": [{
            "shape": o["shape"], "color": o["color"], "size": o["size"], "material": o["material"],
            "3d_coords": [round(6 * o["x"] / size - 3, 3), round(3 - 6 * o["y"] / size, 3), round(6 * o["r"] / size, 3)],
            "pixel_coords": [round(o["x"], 2), round(o["y"], 2), round(o["y"] / size, 3)],
            "rotation": 0.0} for o in objects],
        "relationships": rels,
        "directions": {"left": [-1, 0, 0], "right": [1, 0, 0], "front": [0, -1, 0], "behind": [0, 1, 0]},
        "image_size": size,
    }


def render(scene, supersample=2):
    """Draw a scene as (S, S, 3) uint8, a pure function of the scene dict. Cubes are squares,
    spheres discs, cylinders upright bodies with an elliptic cap; rubber is matte and evenly lit,
    metal is darker with a bright specular highlight. Supersampled for smooth edges."""
    S, ss = scene["image_size"], supersample
    n = S * ss
    floor = 0.50 + 0.12 * (np.arange(n, dtype=np.float32) + 0.5) / n  # a floor lit from the front
    img = np.repeat(np.repeat(floor[:, None, None], n, axis=1), 3, axis=2)  # (n, n, 3)
    for obj in sorted(scene["objects"], key=lambda o: o["pixel_coords"][1]):  # back to front
        cx, cy = obj["pixel_coords"][0] * ss, obj["pixel_coords"][1] * ss
        r = RADIUS[obj["size"]] * S * ss
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, n)  # the object's bounding box
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, n)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dx, dy = (xx - cx) / r, (yy - cy) / r  # object-centred coordinates, radius 1
        cap = np.zeros_like(dx, dtype=bool)
        if obj["shape"] == "cube":
            mask = np.maximum(abs(dx), abs(dy)) <= 0.88
        elif obj["shape"] == "sphere":
            mask = dx ** 2 + dy ** 2 <= 1.0
        else:  # cylinder: a narrower upright body and an elliptic top face
            cap = (dx / 0.68) ** 2 + ((dy + 0.78) / 0.24) ** 2 <= 1.0
            mask = ((abs(dx) <= 0.68) & (abs(dy) <= 0.78 + (dy > 0) * 0.2)) | cap
        color = np.array(RGB[obj["color"]], dtype=np.float32) / 255
        if obj["material"] == "rubber":  # matte: flat colour, slightly lit from above
            shade = color * (0.92 - 0.10 * np.clip(dy, -1, 1))[..., None]
        else:  # metal: darker body, strong white highlight up-left, bright rim
            spec = np.exp(-((dx + 0.35) ** 2 + (dy + 0.35) ** 2) / 0.08)[..., None]
            shade = color * 0.55 + (0.95 - color * 0.55) * spec
        shade = np.where(cap[..., None], np.minimum(shade * 1.25 + 0.05, 1.0), shade)
        img[y0:y1, x0:x1] = np.where(mask[..., None], shade, img[y0:y1, x0:x1])
    img = img.reshape(S, ss, S, ss, 3).mean(axis=(1, 3))  # (S, S, 3)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


# -- question templates written for this project -------------------------------------------------

SYNONYMS = {"large": ("large", "big"), "small": ("small", "tiny"), "metal": ("metal", "metallic"),
            "rubber": ("rubber", "matte"), "cube": ("cube", "block"), "sphere": ("sphere", "ball"),
            "cylinder": ("cylinder",)}
REL_TEXT = {"left": "left of", "right": "right of", "front": "in front of", "behind": "behind"}
QUERY_TEXT = {"color": "What color is the {}?", "shape": "What shape is the {}?",
              "size": "What size is the {}?", "material": "What is the {} made of?"}


class _Question:
    """A program under construction (CLEVR nodes, post-order) on one scene."""

    def __init__(self, rng, scene):
        self.rng, self.scene, self.objs, self.nodes = rng, scene, scene["objects"], []
        self.everything = list(range(len(self.objs)))

    def add(self, fn, inputs=(), value=None):
        self.nodes.append({"function": fn, "inputs": list(inputs), "value_inputs": [value] if value else []})
        return len(self.nodes) - 1

    def filters(self, inp, desc):
        for attr in ATTR_ORDER:
            if attr in desc:
                inp = self.add(f"filter_{attr}", [inp], desc[attr])
        return inp

    def select(self, desc, inp=None):  # filters on the whole scene (or on `inp`)
        return self.filters(self.add("scene") if inp is None else inp, desc)

    def unique(self, desc, inp=None):
        return self.add("unique", [self.select(desc, inp)])

    def match(self, pool, desc):
        return [i for i in pool if all(self.objs[i][a] == v for a, v in desc.items())]

    def unique_desc(self, pool, target, exclude=()):
        """Attributes of `target` that pick it out of `pool` alone (a few extra ones at random)."""
        attrs = [a for a in ATTR_ORDER if a not in exclude]
        self.rng.shuffle(attrs)
        k = int(self.rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))
        desc = {a: self.objs[target][a] for a in attrs[:k]}
        for a in attrs[k:]:
            if len(self.match(pool, desc)) == 1:
                break
            desc[a] = self.objs[target][a]
        return desc if len(self.match(pool, desc)) == 1 else None

    def set_desc(self, pool, min_attrs=1, exclude=()):
        """A description of a set: attributes of an object of `pool`, or random values."""
        attrs = [a for a in ATTR_ORDER if a not in exclude]
        self.rng.shuffle(attrs)
        k = max(min_attrs, int(self.rng.choice([0, 1, 2, 3], p=[0.2, 0.45, 0.25, 0.1])))
        if pool and self.rng.random() < 0.7:
            source = self.objs[int(self.rng.choice(pool))]
            return {a: source[a] for a in attrs[:k]}
        return {a: str(self.rng.choice(ATTRIBUTES[a])) for a in attrs[:k]}

    def noun(self, desc, plural=False):
        words = [str(self.rng.choice(SYNONYMS.get(desc[a], (desc[a],))))
                 for a in ("size", "color", "material") if a in desc]
        noun = str(self.rng.choice(SYNONYMS[desc["shape"]])) if "shape" in desc else str(self.rng.choice(["thing", "object"]))
        return " ".join(words + [noun + ("es" if plural and noun.endswith("s") else "s" if plural else "")])

    def anchor(self, pool=None, exclude=()):
        """A random object of `pool` with a description that makes it unique there."""
        pool = self.everything if pool is None else pool
        if not pool:
            return None, None
        target = int(self.rng.choice(pool))
        return target, self.unique_desc(pool, target, exclude)

    def rel(self):
        return str(self.rng.choice(RELATIONS))


def _count(q):
    d = q.set_desc(q.everything)
    q.add("count", [q.select(d)])
    return f"How many {q.noun(d, True)} are there?"


def _count_relate(q):
    a, da = q.anchor()
    if da is None:
        return None
    rel = q.rel()
    d = q.set_desc(q.scene["relationships"][rel][a], min_attrs=0)
    q.add("count", [q.select(d, q.add("relate", [q.unique(da)], rel))])
    return f"How many {q.noun(d, True)} are {REL_TEXT[rel]} the {q.noun(da)}?"


def _count_union(q):
    d1, d2 = q.set_desc(q.everything), q.set_desc(q.everything)
    if d1 == d2:
        return None
    q.add("count", [q.add("union", [q.select(d1), q.select(d2)])])
    return f"How many things are {q.noun(d1, True)} or {q.noun(d2, True)}?"


def _count_both(q):
    (a, da), (b, db) = q.anchor(), q.anchor()
    if da is None or db is None or a == b:
        return None
    r1, r2 = q.rel(), q.rel()
    rels = q.scene["relationships"]
    d = q.set_desc(sorted(set(rels[r1][a]) & set(rels[r2][b])), min_attrs=0)
    both = q.add("intersect", [q.add("relate", [q.unique(da)], r1), q.add("relate", [q.unique(db)], r2)])
    q.add("count", [q.select(d, both)])
    return (f"How many {q.noun(d, True)} are both {REL_TEXT[r1]} the {q.noun(da)} "
            f"and {REL_TEXT[r2]} the {q.noun(db)}?")


def _count_same(q, attr):
    a, da = q.anchor(exclude=(attr,))
    if da is None:
        return None
    pool = [j for j in q.everything if j != a and q.objs[j][attr] == q.objs[a][attr]]
    d = q.set_desc(pool, min_attrs=0, exclude=(attr,))
    q.add("count", [q.select(d, q.add(f"same_{attr}", [q.unique(da)]))])
    return f"How many other {q.noun(d, True)} have the same {attr} as the {q.noun(da)}?"


def _two_hops(q):
    """`the <db> that is <r1> the <da>`: a unique object found through one relation."""
    a, da = q.anchor()
    if da is None:
        return None
    r1 = q.rel()
    b, db = q.anchor(q.scene["relationships"][r1][a])
    if db is None:
        return None
    node = q.unique(db, q.add("relate", [q.unique(da)], r1))
    return b, node, f"the {q.noun(db)} that is {REL_TEXT[r1]} the {q.noun(da)}"


def _count_two_hops(q):
    hop = _two_hops(q)
    if hop is None:
        return None
    b, node, phrase = hop
    r2 = q.rel()
    d = q.set_desc(q.scene["relationships"][r2][b], min_attrs=0)
    q.add("count", [q.select(d, q.add("relate", [node], r2))])
    return f"How many {q.noun(d, True)} are {REL_TEXT[r2]} {phrase}?"


def _exist(q):
    d = q.set_desc(q.everything)
    q.add("exist", [q.select(d)])
    return f"Are there any {q.noun(d, True)}?" if q.rng.random() < 0.5 else f"Is there a {q.noun(d)}?"


def _exist_relate(q):
    a, da = q.anchor()
    if da is None:
        return None
    rel = q.rel()
    d = q.set_desc(q.scene["relationships"][rel][a], min_attrs=0)
    q.add("exist", [q.select(d, q.add("relate", [q.unique(da)], rel))])
    return f"Are there any {q.noun(d, True)} {REL_TEXT[rel]} the {q.noun(da)}?"


def _exist_same(q, attr):
    a, da = q.anchor(exclude=(attr,))
    if da is None:
        return None
    pool = [j for j in q.everything if j != a and q.objs[j][attr] == q.objs[a][attr]]
    d = q.set_desc(pool, min_attrs=0, exclude=(attr,))
    q.add("exist", [q.select(d, q.add(f"same_{attr}", [q.unique(da)]))])
    return f"Is there another {q.noun(d)} that has the same {attr} as the {q.noun(da)}?"


def _exist_two_hops(q):
    hop = _two_hops(q)
    if hop is None:
        return None
    b, node, phrase = hop
    r2 = q.rel()
    d = q.set_desc(q.scene["relationships"][r2][b], min_attrs=0)
    q.add("exist", [q.select(d, q.add("relate", [node], r2))])
    return f"Is there a {q.noun(d)} {REL_TEXT[r2]} {phrase}?"


def _compare_counts(q, fn):
    d1, d2 = q.set_desc(q.everything), q.set_desc(q.everything)
    if d1 == d2:
        return None
    q.add(fn, [q.add("count", [q.select(d1)]), q.add("count", [q.select(d2)])])
    n1, n2 = q.noun(d1, True), q.noun(d2, True)
    return {"equal_integer": f"Are there the same number of {n1} and {n2}?",
            "less_than": f"Are there fewer {n1} than {n2}?",
            "greater_than": f"Are there more {n1} than {n2}?"}[fn]


def _more_relate(q):
    a, da = q.anchor()
    if da is None:
        return None
    rel = q.rel()
    d1 = q.set_desc(q.scene["relationships"][rel][a], min_attrs=0)
    d2 = q.set_desc(q.everything)
    left = q.add("count", [q.select(d1, q.add("relate", [q.unique(da)], rel))])
    q.add("greater_than", [left, q.add("count", [q.select(d2)])])
    return f"Are there more {q.noun(d1, True)} {REL_TEXT[rel]} the {q.noun(da)} than {q.noun(d2, True)}?"


def _query(q, attr):
    a, da = q.anchor(exclude=(attr,))
    if da is None:
        return None
    q.add(f"query_{attr}", [q.unique(da)])
    return QUERY_TEXT[attr].format(q.noun(da))


def _query_relate(q, attr):
    a, da = q.anchor()
    if da is None:
        return None
    rel = q.rel()
    b, db = q.anchor(q.scene["relationships"][rel][a], exclude=(attr,))
    if db is None:
        return None
    q.add(f"query_{attr}", [q.unique(db, q.add("relate", [q.unique(da)], rel))])
    return QUERY_TEXT[attr].format(f"{q.noun(db)} that is {REL_TEXT[rel]} the {q.noun(da)}")


def _compare_attribute(q, attr):
    (a, da), (b, db) = q.anchor(exclude=(attr,)), q.anchor(exclude=(attr,))
    if da is None or db is None or a == b:
        return None
    q.add(f"equal_{attr}", [q.add(f"query_{attr}", [q.unique(da)]), q.add(f"query_{attr}", [q.unique(db)])])
    if q.rng.random() < 0.5:
        return f"Does the {q.noun(da)} have the same {attr} as the {q.noun(db)}?"
    return f"Is the {q.noun(da)} the same {attr} as the {q.noun(db)}?"


# The question families: (name, template, extra argument). The family index is the position here.
FAMILIES = (
    [("count", _count, None), ("count_relate", _count_relate, None), ("count_union", _count_union, None),
     ("count_both", _count_both, None), ("count_same_color", _count_same, "color"),
     ("count_same_shape", _count_same, "shape"), ("count_two_hops", _count_two_hops, None),
     ("exist", _exist, None), ("exist_relate", _exist_relate, None), ("exist_same_size", _exist_same, "size"),
     ("exist_same_material", _exist_same, "material"), ("exist_two_hops", _exist_two_hops, None),
     ("equal_integer", _compare_counts, "equal_integer"), ("less_than", _compare_counts, "less_than"),
     ("greater_than_relate", _more_relate, None)]
    + [(f"query_{a}", _query, a) for a in ATTR_ORDER]
    + [(f"query_{a}_relate", _query_relate, a) for a in ATTR_ORDER]
    + [(f"equal_{a}", _compare_attribute, a) for a in ATTR_ORDER])


def _answer_domain(name):
    """How many answers a family can have (None for counts: learned from what has been seen)."""
    for attr in ATTR_ORDER:
        if name.startswith(f"query_{attr}"):
            return len(ATTRIBUTES[attr])
    return None if name.startswith("count") else 2


def make_question(rng, scene, family):
    """One instance of a question family on a scene, or None when the draw does not fit the scene.
    Returns (text, program, answer); the answer comes from the symbolic executor."""
    name, template, arg = FAMILIES[family]
    q = _Question(rng, scene)
    text = template(q) if arg is None else template(q, arg)
    if text is None:
        return None
    try:
        return text, q.nodes, execute(q.nodes, scene)
    except IllPosed:  # the templates build well-posed questions; this is the executor's guard
        return None


def generate_split(rng, split, num_images, per_image, size, max_objects=5):
    """Scenes and balanced questions for one split. Balancing (as CLEVR does per template):
    an answer is refused in a family once it is over-represented there, so the answer alone
    cannot be guessed from the family."""
    counts = [dict() for _ in FAMILIES]
    domains = [_answer_domain(f[0]) for f in FAMILIES]
    scenes, questions = [], []
    for index in range(num_images):
        scene = sample_scene(rng, index, split, size, max_objects=max_objects)
        scenes.append(scene)
        got = 0
        for family in rng.permutation(len(FAMILIES)).tolist() * 3:
            if got == per_image:
                break
            c = counts[family]
            for _ in range(6):
                made = make_question(rng, scene, family)
                if made is None:
                    continue
                text, program, answer = made
                n, m = sum(c.values()), domains[family] or max(len(c), 1)
                cap = n / m + 1 if m == 2 else 1.15 * n / m + 2
                if c.get(answer, 0) < cap:
                    c[answer] = c.get(answer, 0) + 1
                    questions.append({
                        "question": text, "answer": answer, "program": program,
                        "image_index": index, "image_filename": scene["image_filename"],
                        "question_family_index": family, "question_index": len(questions), "split": split})
                    got += 1
                    break
    return scenes, questions


def majority_baseline(train_questions, val_questions):
    """Accuracy on val of answering each question with its family's most common train answer."""
    per_family = {}
    for q in train_questions:
        c = per_family.setdefault(q["question_family_index"], {})
        c[q["answer"]] = c.get(q["answer"], 0) + 1
    guess = {f: max(c, key=c.get) for f, c in per_family.items()}
    hits = [guess.get(q["question_family_index"]) == q["answer"] for q in val_questions]
    return float(np.mean(hits))


def write_png(path, rgb):
    """A minimal PNG writer (8-bit RGB), so that the built-in data needs no image library."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    Path(path).write_bytes(png + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def generate(out, tiny=False, seed=0, log=print, **sizes):
    """Write the built-in mini-CLEVR in CLEVR's layout: questions/ and scenes/ as in the release,
    images/{split}.h5 (dataset `images`, (N, S, S, 3) uint8: no image library needed) and a
    preview.png of the first training images."""
    cfg = dict(BUILTIN["tiny" if tiny else "default"], **{k: v for k, v in sizes.items() if v})
    out = Path(out)
    for sub in ("questions", "scenes", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0, split_questions = time.time(), {}
    for split_id, split in enumerate(("train", "val")):
        rng = np.random.default_rng([seed, split_id])
        scenes, questions = generate_split(rng, split, cfg[f"{split}_images"], cfg["questions_per_image"],
                                           cfg["image_size"], cfg["max_objects"])
        info = {"split": split, "version": "mini-clevr-%d" % GENERATOR_VERSION, "seed": seed}
        (out / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"info": info, "scenes": scenes}))
        (out / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps({"info": info, "questions": questions}))
        images = np.stack([render(s) for s in scenes])  # (N, S, S, 3)
        with h5py.File(out / "images" / f"{split}.h5", "w") as f:
            f.create_dataset("images", data=images)
        if split == "train":
            grid = images[:16].reshape(4, 4, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
            write_png(out / "preview.png", grid.reshape(4 * images.shape[1], 4 * images.shape[2], 3))
        split_questions[split] = questions
        log(f"  {split}: {len(scenes)} images, {len(questions)} questions")
    base = majority_baseline(split_questions["train"], split_questions["val"])
    log(f"generated mini-CLEVR in {time.time() - t0:.0f}s -> {out}; "
        f"majority-answer-per-family baseline on val: {100 * base:.1f}%")
    return base


# ------------------------------------------------------------------------------------------------
# Preprocessing, compatible with clevr-iep: vocab.json and questions h5
# ------------------------------------------------------------------------------------------------

def tokenize(text):
    """clevr-iep's tokenizer: lowercase, drop `?` and `.`, keep `;` and `,` as tokens."""
    text = text.lower().replace("?", "").replace(".", "")
    for p in ";,":
        text = text.replace(p, f" {p} ")
    return text.split()


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


def vocab_hash(vocab):
    return hashlib.sha1(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:12]


def _load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-download or regenerate this file") from None


def _encode(tokens, to_idx, unk_ok, what):
    ids = [START]
    for t in tokens:
        if t not in to_idx and not unk_ok:
            raise DataError(f"{what} token {t!r} is not in the vocabulary; if --vocab was made for another "
                            "dataset, prepare without --vocab to build one from this train split")
        ids.append(to_idx.get(t, UNK))
    return ids + [END]


def encode_questions(questions, vocab, path, tokenizer=tokenize):
    """Write a clevr-iep questions h5. `programs` (prefix) and `answers` are written only when
    every question has them (the CLEVR test split has neither)."""
    qv, pv, av = (vocab[k] for k in ("question_token_to_idx", "program_token_to_idx", "answer_token_to_idx"))
    qs = [_encode(tokenizer(q["question"]), qv, True, "question") for q in questions]
    has_programs = all("program" in q for q in questions)
    has_answers = all("answer" in q for q in questions)
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
            f.create_dataset("programs", data=pad([_encode(list_to_prefix(q["program"]), pv, False, "program") for q in questions]))
        if has_answers:
            f.create_dataset("answers", data=np.array([av.get(q["answer"], UNK) for q in questions], dtype=np.int64))
    return unk


def _resize(images, size):
    """(N, H, W, 3) uint8 -> (N, 3, size, size) uint8, area-antialiased (torch, no image library)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _read_pngs(files, log):
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading CLEVR's PNG images needs Pillow: pip install pillow") from None
    t0 = time.time()
    for i, path in enumerate(files):
        with Image.open(path) as im:
            yield np.asarray(im.convert("RGB"))  # the release's PNGs are RGBA: drop alpha
        if (i + 1) % 1000 == 0:
            log(f"    {i + 1}/{len(files)} images, {(i + 1) / (time.time() - t0):.0f}/s")


def prepare_pixels(clevr_dir, split, num_images, size, path, log=print):
    """Images of a split as (N, 3, size, size) uint8 in h5 (dataset `images`), row = image_index.
    Reads images/{split}.h5 (the built-in data) or images/{split}/*.png (the release, via Pillow)."""
    src = clevr_dir / "images" / f"{split}.h5"
    with h5py.File(path, "w") as out:
        dset = out.create_dataset("images", (num_images, 3, size, size), dtype=np.uint8)
        if src.exists():
            with h5py.File(src, "r") as f:
                for i in range(0, num_images, 1024):
                    dset[i:i + 1024] = _resize(f["images"][i:i + 1024], size)
            return
        files = [clevr_dir / "images" / split / f"CLEVR_{split}_{i:06d}.png" for i in range(num_images)]
        missing = [p for p in files if not p.exists()]
        if missing:
            raise DataError(f"{len(missing)} images of split {split} are missing, e.g. {missing[0]}; "
                            f"expected the CLEVR_v1.0 layout images/{split}/CLEVR_{split}_NNNNNN.png")
        batch, start = [], 0
        for img in _read_pngs(files, log):
            batch.append(img)
            if len(batch) == 256:
                dset[start:start + 256] = _resize(np.stack(batch), size)
                start, batch = start + 256, []
        if batch:
            dset[start:] = _resize(np.stack(batch), size)


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


def prepare(clevr_dir, out, images="pixels", size=64, vocab=None, features_dir=None, log=print):
    """CLEVR layout -> prepared directory (vocab.json, info.json, questions and images h5)."""
    clevr_dir, out = Path(clevr_dir), Path(out)
    if not (clevr_dir / "questions").is_dir():
        raise DataError(f"{clevr_dir}: no questions/ folder; expected the CLEVR_v1.0 layout "
                        f"(images/, questions/, scenes/)")
    splits = [s for s in ("train", "val", "test") if (clevr_dir / "questions" / f"CLEVR_{s}_questions.json").exists()]
    if not splits:
        raise DataError(f"{clevr_dir}/questions has no CLEVR_{{train,val,test}}_questions.json")
    data = {}
    for s in splits:
        path = clevr_dir / "questions" / f"CLEVR_{s}_questions.json"
        doc = _load_json(path, f"{s} questions")
        if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
            raise DataError(f"{path}: expected a JSON object with a 'questions' list")
        data[s] = check_questions(doc["questions"], path)
    out.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        if "train" not in data:
            raise DataError("no train split to build the vocabulary from; pass --vocab VOCAB_JSON")
        vocab = build_vocab(data["train"])
    elif not isinstance(vocab, dict):
        vocab = load_vocab(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1))
    info = {"image_kind": images, "images": {}, "source": str(clevr_dir.resolve())}
    for s, questions in data.items():
        try:
            unk = encode_questions(questions, vocab, out / f"{s}_questions.h5")
        except DataError as e:  # a token missing from a --vocab: name the questions file
            raise DataError(f"{clevr_dir / 'questions' / f'CLEVR_{s}_questions.json'}: {e}") from None
        num_images = max(q["image_index"] for q in questions) + 1
        log(f"  {s}: {len(questions)} questions on {num_images} images, {100 * unk:.2f}% <UNK> words")
        if images in ("pixels", "scene-cnn"):
            prepare_pixels(clevr_dir, s, num_images, size, out / f"{s}_images.h5", log)
            info["images"][s] = f"{s}_images.h5"
        elif images == "features":
            path = Path(features_dir or clevr_dir) / f"{s}_features.h5"
            check_features(path, num_images)
            info["images"][s] = str(path.resolve())
        else:
            raise DataError(f"--images must be pixels, features or scene-cnn, not {images!r}")
    if images == "scene-cnn":
        info.update(scene_cnn_features(clevr_dir, out, size, log=log))
    (out / "info.json").write_text(json.dumps(info, indent=1))
    log(f"prepared {', '.join(data)} -> {out}")
    return out


# ------------------------------------------------------------------------------------------------
# Image features for the built-in data: a small CNN trained on the scenes' own annotations
# ------------------------------------------------------------------------------------------------

class SceneCNN(torch.nn.Module):
    """Pixels (B, 3, S, S) -> per-cell predictions (B, 1 + 15, S/8, S/8): for every 8 x 8 cell, the
    probability that an object is centred there and, times that, the probabilities of each value of
    its four attributes. The built-in data's stand-in for the ImageNet-pretrained ResNet-101 whose
    features MAC reads on real CLEVR: models then learn to reason, not to see, which is what fits in
    a laptop's minutes (README, "The built-in data")."""

    def __init__(self, channels=32):
        super().__init__()
        nn, layers, c = torch.nn, [], 3
        for ch in (32, 64, 64):  # three stride-2 convs: one cell per 8 x 8 pixels
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.GroupNorm(8, ch), nn.ELU()]
            c = ch
        self.body = nn.Sequential(*layers, nn.Conv2d(c, channels, 3, padding=1), nn.ELU())
        self.heads = nn.Conv2d(channels, 1 + sum(len(v) for v in ATTRIBUTES.values()), 1)

    def forward(self, x):
        return self.heads(self.body(x))                                  # (B, 1 + 15, G, G) logits

    def predict(self, x):
        logits = self.forward(x)
        obj = torch.sigmoid(logits[:, :1])                               # (B, 1, G, G)
        sizes = [len(ATTRIBUTES[a]) for a in ATTR_ORDER]
        probs = [obj * part.softmax(1) for part in logits[:, 1:].split(sizes, 1)]
        return torch.cat([obj, *probs], 1)                               # (B, 1 + 15, G, G)


def _cell_targets(scenes, grid):
    """Per cell: -1 (no object centred there) or the index of each attribute's value. (N, 4, G, G)."""
    t = np.full((len(scenes), len(ATTR_ORDER), grid, grid), -1, dtype=np.int64)
    for i, scene in enumerate(scenes):
        for o in scene["objects"]:
            gx, gy = (min(int(v / scene["image_size"] * grid), grid - 1) for v in o["pixel_coords"][:2])
            t[i, :, gy, gx] = [ATTRIBUTES[a].index(o[a]) for a in ATTR_ORDER]
    return torch.from_numpy(t)


def scene_cnn_features(clevr_dir, out, size, channels=32, iters=1500, log=print, seed=0):
    """Train SceneCNN on the train split's pixels and scene annotations, then write its predictions,
    with x and y coordinate channels appended, as {split}_features.h5 (float16)."""
    F = torch.nn.functional
    grid = size // 8
    with h5py.File(out / "train_images.h5", "r") as f:
        pixels = torch.from_numpy(f["images"][:])  # (N, 3, S, S) uint8
    scenes = _load_json(clevr_dir / "scenes" / "CLEVR_train_scenes.json", "train scenes")["scenes"]
    targets = _cell_targets(scenes, grid)  # (N, 4, G, G)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cnn = SceneCNN(channels)
    opt = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    sizes = [len(ATTRIBUTES[a]) for a in ATTR_ORDER]
    t0 = time.time()
    iters = iters if len(pixels) >= 1000 else 30  # the tiny data: a few steps are enough
    for it in range(iters):
        idx = torch.randint(0, len(pixels), (64,), generator=gen)
        logits = cnn(pixels[idx].float() / 255)  # (64, 1 + 15, G, G)
        t = targets[idx]
        present = (t[:, 0] >= 0).float()
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], present)
        for k, part in enumerate(logits[:, 1:].split(sizes, 1)):  # on the cells where an object is centred
            loss = loss + F.cross_entropy(part, t[:, k], ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % 500 == 0:
            log(f"    scene CNN iteration {it + 1}/{iters}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    cnn.eval()
    val_scenes = clevr_dir / "scenes" / "CLEVR_val_scenes.json"
    if (out / "val_images.h5").exists() and val_scenes.exists():  # how well it sees, on val
        with h5py.File(out / "val_images.h5", "r") as f, torch.no_grad():
            logits = cnn(torch.from_numpy(f["images"][:]).float() / 255)  # (N, 16, G, G)
        t = _cell_targets(_load_json(val_scenes, "val scenes")["scenes"], grid)
        present = t[:, 0] >= 0  # (N, G, G)
        accs = [((logits[:, 0] > 0) == present).float().mean()] + [
            (part.argmax(1)[present] == t[:, k][present]).float().mean()
            for k, part in enumerate(logits[:, 1:].split(sizes, 1))]
        log("  scene CNN on val: cells (object or not) {:.1%}; size {:.1%}, color {:.1%}, material {:.1%}, "
            "shape {:.1%} of the objects".format(*accs))
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    coords = torch.stack([xs, ys])  # (2, G, G)
    images = {}
    for split in ("train", "val", "test"):
        src = out / f"{split}_images.h5"
        if not src.exists():
            continue
        with h5py.File(src, "r") as f, h5py.File(out / f"{split}_features.h5", "w") as g, torch.no_grad():
            n = len(f["images"])
            C = 1 + sum(sizes) + 2
            dset = g.create_dataset("features", (n, C, grid, grid), dtype=np.float16)
            for i in range(0, n, 512):
                feats = cnn.predict(torch.from_numpy(f["images"][i:i + 512]).float() / 255)  # (b, 16, G, G)
                dset[i:i + 512] = torch.cat([feats, coords.expand(len(feats), -1, -1, -1)], 1).numpy()
        src.unlink()  # the pixels are in the CLEVR-layout folder; `prepare --images pixels` remakes them
        images[split] = f"{split}_features.h5"
    log(f"  scene CNN: {iters} iterations in {time.time() - t0:.0f}s, features {C} x {grid} x {grid}")
    return {"image_kind": "features", "images": images, "feature_shape": [C, grid, grid],
            "features_from": "scene-cnn"}


# ------------------------------------------------------------------------------------------------
# Hostile inputs: every file is checked where it is read, so that a bad one gives one message that
# names it and the fix, never a stack trace from deep inside (JSON is parsed, never executed; h5 holds
# arrays, never pickles)
# ------------------------------------------------------------------------------------------------

MAX_IMAGES = 10 ** 7  # CLEVR has 100,000 images; an image_index beyond this is a damaged file


def check_questions(questions, path):
    """`questions` (the list of a CLEVR questions JSON) if each has what `prepare` needs, else a DataError."""
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
    return questions


def load_vocab(path):
    """A clevr-iep vocab.json: {question,program,answer}_token_to_idx, each token -> 0..n-1."""
    vocab = _load_json(path, "vocabulary")
    for key in ("question_token_to_idx", "program_token_to_idx", "answer_token_to_idx"):
        to_idx = vocab.get(key) if isinstance(vocab, dict) else None
        if not isinstance(to_idx, dict) or sorted(v for v in to_idx.values() if type(v) is int) != list(range(len(to_idx))):
            raise DataError(f"{path}: {key} is missing or does not number its tokens 0..n-1; this is not a "
                            "vocab.json written by `python data.py prepare`: prepare the data again")
    return vocab


def _read_info(path):
    info = _load_json(path, "data info")
    if (not isinstance(info, dict) or info.get("image_kind") not in ("pixels", "features", "objects")
            or not isinstance(info.get("images"), dict) or not info["images"]
            or not all(isinstance(v, str) for v in info["images"].values())):
        raise DataError(f"{path}: expected image_kind pixels|features|objects and images {{split: file}}, as written by "
                        "`python data.py prepare`: prepare the data again")
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
                            "run `python data.py prepare ... --images pixels` again")
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
                                f"expected {ndim}-D integers as written by `python data.py prepare`: prepare the data again")
            a = d[:].astype(np.int64)
            top = len(vocab[vocab_key]) if vocab_key else MAX_IMAGES
            if a.size and (a.min() < (-1 if name == "question_families" else 0) or a.max() >= top):
                raise DataError(f"{path}: {name!r} holds values from {a.min()} to {a.max()}, outside 0..{top - 1}"
                                + ("; was it prepared with another vocab.json?" if vocab_key else ""))
            out[name] = a
    if len({len(a) for a in out.values()}) > 1:
        raise DataError(f"{path}: its datasets have different lengths "
                        f"({', '.join(f'{k} {len(a)}' for k, a in out.items())}); prepare the data again")
    return out


# ------------------------------------------------------------------------------------------------
# Reading a prepared directory: info, datasets, the loader
# ------------------------------------------------------------------------------------------------

def resolve(data_dir):
    """The prepared directory behind `data_dir` (a generated folder holds it in prepared/)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"{data_dir}: no such data directory; omit --data to use the built-in "
                        f"mini-CLEVR, or run `python data.py prepare CLEVR_DIR --out {data_dir}`")
    for d in (data_dir, data_dir / "prepared"):
        if (d / "vocab.json").exists() and (d / "info.json").exists():
            return d
    hint = (f"it looks like a CLEVR folder: run `python data.py prepare {data_dir} --out {data_dir}/prepared`"
            if (data_dir / "questions").is_dir() else "expected vocab.json and info.json from `python data.py prepare`")
    if (data_dir / "features" / "objects").is_dir():
        hint = f"it looks like a GQA folder: run `python data.py gqa {data_dir}`"
    raise DataError(f"{data_dir}: not a prepared data directory; {hint}")


def load_info(data_dir):
    """What a model needs to know about the data: vocab sizes, the image kind and shape."""
    d = resolve(data_dir)
    vocab, info = load_vocab(d / "vocab.json"), _read_info(d / "info.json")
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


class Split:
    """The questions of one split in memory, and its images: in memory when small (the built-in
    data), read per batch from h5 otherwise (real CLEVR features are ~60 GB)."""

    def __init__(self, data_dir, split, max_memory=2 << 30):
        d = resolve(data_dir)
        info = _read_info(d / "info.json")
        if split not in info["images"]:
            raise DataError(f"{d}: no {split} split (has {', '.join(info['images'])})")
        vocab = load_vocab(d / "vocab.json")
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
        if self.images.size * self.images.dtype.itemsize <= max_memory:
            self.images = self.images[:]
        self.objects = None  # GQA: boxes (N, O, 4) read per batch, num_objects (N,) in memory
        if info["image_kind"] == "objects":
            self.objects = {"boxes": self.file["boxes"], "num_objects": self.file["num_objects"][:]}

    def __len__(self):
        return len(self.questions)

    def batch(self, idx):
        """The batch dict for question rows `idx`."""
        img_idx = self.image_idxs[idx]
        if isinstance(self.images, np.ndarray):
            images = self.images[img_idx]
        else:  # h5 wants increasing, unique indices
            uniq, inverse = np.unique(img_idx, return_inverse=True)
            images = self.images[uniq][inverse]
        image = torch.from_numpy(images)
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
        n = len(self.split) if self.rows is None else len(self.rows)
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
    root = Path(os.environ.get("MINI_CLEVR_CACHE", Path.home() / ".cache" / "mini-clevr")).expanduser()
    return root / f"{'tiny' if tiny else 'default'}-v{GENERATOR_VERSION}"


def ensure_builtin(tiny=False, log=print):
    """The prepared built-in mini-CLEVR, generated on first use into a cache folder
    ($MINI_CLEVR_CACHE or ~/.cache/mini-clevr) and reused. Generated in a temporary folder
    and renamed when complete, so an interrupted generation never leaves half a dataset."""
    final = builtin_dir(tiny)
    if (final / "prepared" / "info.json").exists():
        return final / "prepared"
    log(f"generating the built-in mini-CLEVR{' (tiny)' if tiny else ''} into {final} (first use only)")
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, tiny=tiny, log=log)
    prepare(tmp, tmp / "prepared", images="scene-cnn", size=BUILTIN["tiny" if tiny else "default"]["image_size"], log=log)
    info = tmp / "prepared" / "info.json"
    info.write_text(info.read_text().replace(str(tmp.resolve()), str(final.resolve())))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "prepared"


# ------------------------------------------------------------------------------------------------
# Checkpoints: train.py writes them; it and the analysis tools (dact.py bench, stack_nmn.py figure,
# lnmn.py analyze) read them here, the one module they may all import
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
    except Exception as e:  # a truncated file, not a torch file, ...
        raise DataError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"the file is damaged or not a checkpoint{hint}") from None
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
    on if it is still there, else the built-in data; a DataError if its vocabulary is not the checkpoint's."""
    if data_dir is None:
        saved = ckpt.get("data_dir")
        data_dir = saved if saved and Path(saved).exists() else ensure_builtin()
    data_dir = resolve(data_dir)
    info = load_info(data_dir)
    if info["vocab_hash"] != ckpt["vocab_hash"]:
        raise DataError(f"the checkpoint was trained on data with vocabulary {ckpt['vocab_hash']} "
                        f"({ckpt.get('data_dir', '?')}), but {data_dir} has vocabulary {info['vocab_hash']}: "
                        "word and answer indices would not match. Pass the --data it was trained on")
    return data_dir, info


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


def read_rgb(path):
    """One image file -> (H, W, 3) uint8 (CLEVR's PNGs are RGBA: alpha is dropped). Needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading CLEVR's PNG images needs Pillow: pip install pillow") from None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


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
    14), row i = paths[i]: the layout that `check_features` and `prepare --images features` read.

    Resumable: rows go to `out`.partial with an attribute `done` (rows written so far, set after each
    batch is written and flushed); a later call with the same images and settings continues from
    there, and the file is renamed to `out` when complete. Works with fewer images than one batch
    (clevr-iep's extractor crashes there). `backbone` maps (B, 3, size, size) to features; tests
    pass a small stand-in, the command line `resnet101_layer3()`. Images are read `workers` at a time
    in threads, one batch ahead of the backbone."""
    from concurrent.futures import ThreadPoolExecutor
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

def prepare_humans(humans_dir, clevr_prepared, out, log=print):
    """CLEVR-Humans-{train,val,test}.json -> a prepared directory on the vocabulary of an existing
    prepared CLEVR (copied unchanged, so a CLEVR checkpoint fine-tunes on it with --init): words CLEVR
    never had become <UNK> (the rate is reported), and each question reads the CLEVR images of the split
    its image_filename names, through the prepared CLEVR's image files.
    NOTE (deviation): clevr-iep instead adds words seen at least 10 times to the vocabulary
    (--expand_vocab 1 --unk_threshold 10), which changes the embedding's size."""
    from collections import Counter
    humans_dir, out = Path(humans_dir), Path(out)
    clevr = resolve(clevr_prepared)
    vocab, cinfo = _load_json(clevr / "vocab.json", "vocabulary"), _load_json(clevr / "info.json", "data info")
    splits = {s: humans_dir / f"CLEVR-Humans-{s}.json" for s in ("train", "val", "test")}
    splits = {s: p for s, p in splits.items() if p.exists()}
    if not splits:
        raise DataError(f"{humans_dir}: no CLEVR-Humans-{{train,val,test}}.json")
    out.mkdir(parents=True, exist_ok=True)
    info = {k: v for k, v in cinfo.items() if k not in ("images", "source")}
    info.update(dataset="CLEVR-Humans", images={}, source=str(humans_dir.resolve()), vocab_from=str(clevr.resolve()))
    qv, av, stats = vocab["question_token_to_idx"], vocab["answer_token_to_idx"], {}
    for s, path in splits.items():
        doc = _load_json(path, f"CLEVR-Humans {s} questions")
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
        image_split = image_splits.pop()
        if image_split not in cinfo["images"]:
            raise DataError(f"{path} asks about CLEVR {image_split} images, but {clevr} has no {image_split} split; "
                            f"prepare CLEVR's {image_split} split too")
        unk = encode_questions(questions, vocab, out / f"{s}_questions.h5")
        new_words = Counter(t for q in questions for t in tokenize(q["question"]) if t not in qv)
        bad_answers = sum("answer" in q and q["answer"] not in av for q in questions)
        info["images"][s] = str((clevr / cinfo["images"][image_split]).resolve())
        stats[s] = {"questions": len(questions), "unk_rate": unk, "new_words": dict(new_words.most_common()),
                    "answers_not_in_vocab": bad_answers, "images_of": image_split}
        log(f"  {s}: {len(questions)} questions on CLEVR {image_split} images, {100 * unk:.2f}% <UNK> words"
            + (f" (most frequent: {', '.join(w for w, _ in new_words.most_common(8))})" if new_words else "")
            + (f"; {bad_answers} answers outside CLEVR's answers (encoded <UNK>)" if bad_answers else ""))
    shutil.copyfile(clevr / "vocab.json", out / "vocab.json")  # byte for byte: the same vocabulary hash
    (out / "info.json").write_text(json.dumps(info, indent=1))
    (out / "humans_stats.json").write_text(json.dumps(stats, indent=1))
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
    import re
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
    meta = _load_json(odir / "gqa_objects_info.json", "GQA object features info")
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


def prepare_gqa(gqa_dir, out=None, variant="balanced", val_split="testdev", log=print):
    """GQA -> a prepared directory (default GQA_DIR/prepared, so `train.py --data GQA_DIR` finds it).
    train = {train}_{variant}; val = {val_split}_balanced (the DACT code validates on testdev balanced).
    Words and answers come from the train questions ('<UNK>' elsewhere); there are no programs; each
    question's family is its GQA `types.detailed` (names in info.json)."""
    from collections import Counter
    gqa_dir = Path(gqa_dir)
    out = Path(out) if out else gqa_dir / "prepared"
    if variant not in ("balanced", "all"):
        raise DataError(f"variant must be balanced or all, not {variant!r}")
    sources = {"train": ("train", variant), "val": (val_split, "balanced")}
    files = {s: _gqa_question_files(gqa_dir, *src) for s, src in sources.items()}  # all there before work
    out.mkdir(parents=True, exist_ok=True)
    row_of = gqa_objects(gqa_dir, out / "objects.h5", log)
    raw = {}
    for s, paths in files.items():
        raw[s] = []
        for path in paths:
            doc = _load_json(path, f"GQA {s} questions")
            if not isinstance(doc, dict):
                raise DataError(f"{path}: expected a JSON object {{question id: question}}")
            raw[s] += [(qid, q) for qid, q in doc.items()]
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
        unk = encode_questions(questions, vocab, out / f"{s}_questions.h5", tokenizer=tokenize_gqa)
        unseen = sum(q.get("answer") not in vocab["answer_token_to_idx"] for q in questions if "answer" in q)
        log(f"  {s} ({'/'.join(p.name for p in files[s][:3])}{'...' if len(files[s]) > 3 else ''}): "
            f"{len(questions)} questions, {100 * unk:.2f}% <UNK> words"
            + (f", {unseen} answers never seen in train" if unseen else ""))
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1))
    with h5py.File(out / "objects.h5", "r") as f:
        shape = list(f["features"].shape[1:])
    info = {"dataset": "GQA", "image_kind": "objects", "images": {"train": "objects.h5", "val": "objects.h5"},
            "feature_shape": shape, "family_names": families, "source": str(gqa_dir.resolve()),
            "questions_from": {s: f"{a}_{b}" for s, (a, b) in sources.items()}}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    log(f"prepared GQA ({variant}, val = {val_split} balanced): {len(vocab['question_token_to_idx'])} words, "
        f"{len(vocab['answer_token_to_idx'])} answers -> {out}")
    return out


def dataset_name(data_dir):
    """'GQA', 'CLEVR-Humans' or 'CLEVR' (the default, mini-CLEVR included): what info.json says."""
    return _load_json(resolve(data_dir) / "info.json", "data info").get("dataset", "CLEVR")


def _rows(dset, idx):
    """dset[idx] for an array or an h5 dataset (which wants increasing, unique indices)."""
    if isinstance(dset, np.ndarray):
        return dset[idx]
    uniq, inverse = np.unique(idx, return_inverse=True)
    return dset[uniq][inverse]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def main(argv=None):
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
    r = sub.add_parser("prepare", help="CLEVR_v1.0 folder -> prepared folder (vocab, h5)")
    r.add_argument("clevr_dir")
    r.add_argument("--out", required=True)
    r.add_argument("--images", choices=("pixels", "features", "scene-cnn"), default="pixels",
                   help="scene-cnn: features of a small CNN trained on the scenes (the built-in data)")
    r.add_argument("--size", type=int, default=64, help="pixels: resize images to SIZE x SIZE")
    r.add_argument("--features-dir", help="features: folder with {split}_features.h5 (default: CLEVR_DIR)")
    r.add_argument("--vocab", help="encode with this existing vocab.json instead of building one")
    x = sub.add_parser("features", help="ResNet-101 layer3 features of CLEVR's PNGs (needs torchvision, Pillow)")
    x.add_argument("clevr_dir")
    x.add_argument("--out", required=True, help="writes {split}_features.h5 here (prepare --features-dir)")
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
    args = p.parse_args(argv)
    try:
        if args.cmd == "generate":
            if args.out is None:
                print(ensure_builtin(args.tiny))
                return
            sizes = {k: getattr(args, k) for k in ("train_images", "val_images", "questions_per_image", "image_size")}
            generate(args.out, tiny=args.tiny, seed=args.seed, **sizes)
            size = args.image_size or BUILTIN["tiny" if args.tiny else "default"]["image_size"]
            prepare(args.out, Path(args.out) / "prepared", images="scene-cnn", size=size)
            # --data alone picks the paper preset (train.py); this data is the built-in kind, so say laptop
            print(f"train with: python train.py mac --data {args.out} --preset laptop")
        elif args.cmd == "features":
            device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
            extract_clevr_features(args.clevr_dir, args.out, splits=args.splits, clevr_iep_std=args.clevr_iep_std,
                                   batch_size=args.batch_size, dtype="float16" if args.float16 else "float32",
                                   device=device, workers=args.workers)
            print(f"next: python data.py prepare {args.clevr_dir} --out DIR --images features --features-dir {args.out}")
        elif args.cmd == "humans":
            prepare_humans(args.humans_dir, args.clevr, args.out)
            print(f"fine-tune with: python train.py mac --data {args.out} --init CLEVR_RUN/best.pt")
        elif args.cmd == "gqa":
            out = prepare_gqa(args.gqa_dir, args.out, args.variant, args.val_split)
            print(f"train with: python train.py mac --data {out}")
        else:
            prepare(args.clevr_dir, args.out, args.images, args.size, args.vocab, args.features_dir)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
