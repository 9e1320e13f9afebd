"""Everything about data: CLEVR's formats, programs, a symbolic executor, the built-in mini-CLEVR
generator, clevr-iep style preprocessing, and the batch loader that every model reads from.

    python data.py generate [--out DIR] [--tiny]          # built-in mini-CLEVR, CLEVR layout + prepared/
    python data.py prepare CLEVR_DIR --out DIR [--images pixels|features] [--size N]

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
    or {split}_features.h5    (N, 34, S/8, S/8) float16        (--images scene-cnn, the built-in default)

A batch is a dict of tensors: image (B, C, H, W) float, question (B, Lq) long padded with 0,
question_len (B,), program (B, Lp) prefix tokens, answer (B,) (-100 where unknown), family (B,),
kind (B,) index into QUESTION_KINDS (-1 unknown), image_index (B,).
"""
import argparse
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
    nodes = [normalize_node(n) for n in program]

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

GENERATOR_VERSION = 2
BUILTIN = {  # sizes of the two built-in datasets
    "default": dict(train_images=5000, val_images=1000, questions_per_image=10, image_size=48, max_objects=5),
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
            raise DataError(f"{what} token {t!r} is not in the vocabulary")
        ids.append(to_idx.get(t, UNK))
    return ids + [END]


def encode_questions(questions, vocab, path):
    """Write a clevr-iep questions h5. `programs` (prefix) and `answers` are written only when
    every question has them (the CLEVR test split has neither)."""
    qv, pv, av = (vocab[k] for k in ("question_token_to_idx", "program_token_to_idx", "answer_token_to_idx"))
    qs = [_encode(tokenize(q["question"]), qv, True, "question") for q in questions]
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
        data[s] = doc["questions"]
    out.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        if "train" not in data:
            raise DataError("no train split to build the vocabulary from; pass --vocab VOCAB_JSON")
        vocab = build_vocab(data["train"])
    elif not isinstance(vocab, dict):
        vocab = _load_json(vocab, "vocabulary")
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1))
    info = {"image_kind": images, "images": {}, "source": str(clevr_dir.resolve())}
    for s, questions in data.items():
        unk = encode_questions(questions, vocab, out / f"{s}_questions.h5")
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
    """Pixels (B, 3, S, S) -> features (B, C, S/8, S/8), trained to tell, for every cell, whether an
    object is centred there and its four attributes. The built-in data's stand-in for the
    ImageNet-pretrained ResNet-101 whose features MAC reads on real CLEVR: models then learn to
    reason, not to see, which is what fits in a laptop's minutes (README, "The built-in data")."""

    def __init__(self, channels=32):
        super().__init__()
        nn, layers, c = torch.nn, [], 3
        for ch in (32, 64, 64):  # three stride-2 convs: one cell per 8 x 8 pixels
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.GroupNorm(8, ch), nn.ELU()]
            c = ch
        self.body = nn.Sequential(*layers, nn.Conv2d(c, channels, 3, padding=1), nn.ELU())
        self.heads = nn.Conv2d(channels, 1 + sum(len(v) for v in ATTRIBUTES.values()), 1)

    def forward(self, x):
        return self.body(x)


def _cell_targets(scenes, grid):
    """Per cell: -1 (no object centred there) or the index of each attribute's value. (N, 4, G, G)."""
    t = np.full((len(scenes), len(ATTR_ORDER), grid, grid), -1, dtype=np.int64)
    for i, scene in enumerate(scenes):
        for o in scene["objects"]:
            gx, gy = (min(int(v / scene["image_size"] * grid), grid - 1) for v in o["pixel_coords"][:2])
            t[i, :, gy, gx] = [ATTRIBUTES[a].index(o[a]) for a in ATTR_ORDER]
    return torch.from_numpy(t)


def scene_cnn_features(clevr_dir, out, size, channels=32, iters=1500, log=print, seed=0):
    """Train SceneCNN on the train split's pixels and scene annotations, then write its features,
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
    splits = np.cumsum([0] + [len(v) for v in ATTRIBUTES.values()])
    t0 = time.time()
    iters = iters if len(pixels) >= 1000 else 30  # the tiny data: a few steps are enough
    for it in range(iters):
        idx = torch.randint(0, len(pixels), (64,), generator=gen)
        logits = cnn.heads(cnn(pixels[idx].float() / 255))  # (64, 1 + 15, G, G)
        t = targets[idx]
        present = (t[:, 0] >= 0).float()
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], present)
        for k in range(len(ATTR_ORDER)):  # cross-entropy on the cells where an object is centred
            loss = loss + F.cross_entropy(logits[:, 1 + splits[k]:1 + splits[k + 1]], t[:, k], ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % 500 == 0:
            log(f"    scene CNN iteration {it + 1}/{iters}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    cnn.eval()
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    coords = torch.stack([xs, ys])  # (2, G, G)
    images = {}
    for split in ("train", "val", "test"):
        src = out / f"{split}_images.h5"
        if not src.exists():
            continue
        with h5py.File(src, "r") as f, h5py.File(out / f"{split}_features.h5", "w") as g, torch.no_grad():
            n = len(f["images"])
            dset = g.create_dataset("features", (n, channels + 2, grid, grid), dtype=np.float16)
            for i in range(0, n, 512):
                feats = cnn(torch.from_numpy(f["images"][i:i + 512]).float() / 255)  # (b, C, G, G)
                dset[i:i + 512] = torch.cat([feats, coords.expand(len(feats), -1, -1, -1)], 1).numpy()
        src.unlink()  # the pixels are in the CLEVR-layout folder; `prepare --images pixels` remakes them
        images[split] = f"{split}_features.h5"
    log(f"  scene CNN: {iters} iterations in {time.time() - t0:.0f}s, features {channels + 2} x {grid} x {grid}")
    return {"image_kind": "features", "images": images, "feature_shape": [channels + 2, grid, grid],
            "features_from": "scene-cnn"}


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
    raise DataError(f"{data_dir}: not a prepared data directory; {hint}")


def load_info(data_dir):
    """What a model needs to know about the data: vocab sizes, the image kind and shape."""
    d = resolve(data_dir)
    vocab, info = _load_json(d / "vocab.json", "vocabulary"), _load_json(d / "info.json", "data info")
    split = "train" if "train" in info["images"] else next(iter(info["images"]))
    path = d / info["images"][split]
    if info["image_kind"] == "features":
        name = check_features(path, shape=info.get("feature_shape", (1024, 14, 14)))
    else:
        name = "images"
    with h5py.File(path, "r") as f:
        shape = tuple(f[name].shape[1:])
    answers = sorted(vocab["answer_token_to_idx"], key=vocab["answer_token_to_idx"].get)
    return {"num_words": len(vocab["question_token_to_idx"]), "num_answers": len(answers),
            "num_program_tokens": len(vocab["program_token_to_idx"]),
            "program_tokens": sorted(vocab["program_token_to_idx"], key=vocab["program_token_to_idx"].get),
            "image_kind": info["image_kind"],
            "image_shape": shape, "vocab_hash": vocab_hash(vocab), "answers": answers,
            "splits": list(info["images"]), "data_dir": str(d)}


class Split:
    """The questions of one split in memory, and its images: in memory when small (the built-in
    data), read per batch from h5 otherwise (real CLEVR features are ~60 GB)."""

    def __init__(self, data_dir, split, max_memory=2 << 30):
        d = resolve(data_dir)
        info = _load_json(d / "info.json", "data info")
        if split not in info["images"]:
            raise DataError(f"{d}: no {split} split (has {', '.join(info['images'])})")
        vocab = _load_json(d / "vocab.json", "vocabulary")
        with h5py.File(d / f"{split}_questions.h5", "r") as f:
            self.questions = f["questions"][:].astype(np.int64)
            self.image_idxs = f["image_idxs"][:].astype(np.int64)
            self.families = f["question_families"][:].astype(np.int64)
            n = len(self.questions)
            self.programs = f["programs"][:].astype(np.int64) if "programs" in f else np.zeros((n, 1), np.int64)
            self.answers = f["answers"][:].astype(np.int64) if "answers" in f else np.full(n, -100, np.int64)
        self.lengths = (self.questions != NULL).sum(1)
        kind_of = {i: QUESTION_KINDS.index(question_kind(token_function(t)))
                   if question_kind(token_function(t)) else -1 for t, i in vocab["program_token_to_idx"].items()}
        root = self.programs[:, 1] if self.programs.shape[1] > 1 else np.zeros(n, np.int64)
        self.kinds = np.array([kind_of.get(int(t), -1) for t in root], dtype=np.int64)
        path = d / info["images"][split]
        self.is_pixels = info["image_kind"] == "pixels"
        name = "images" if self.is_pixels else check_features(path, shape=info.get("feature_shape", (1024, 14, 14)))
        self.file = h5py.File(path, "r")
        self.images = self.file[name]
        if len(self.image_idxs) and self.image_idxs.max() >= len(self.images):
            raise DataError(f"{path}: {len(self.images)} images, but questions refer to image "
                            f"{self.image_idxs.max()}; the image file belongs to another split or dataset")
        if self.images.size * self.images.dtype.itemsize <= max_memory:
            self.images = self.images[:]

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
        return {"image": image, "question": t(self.questions[idx, :L]), "question_len": t(self.lengths[idx]),
                "program": t(prog[:, :P]), "answer": t(self.answers[idx]), "family": t(self.families[idx]),
                "kind": t(self.kinds[idx]), "image_index": t(img_idx)}


class Loader:
    """Batches of a Split. The shuffled order is a function of (seed, epoch) alone, and `start`
    skips the batches already done, so a resumed run sees exactly the batches it would have.
    `rows` (an int array, or None for all) restricts it to those rows of the split."""

    def __init__(self, split, batch_size, shuffle, seed=0, drop_last=False):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.drop_last = drop_last and len(split) >= batch_size  # a split smaller than a batch still yields it
        self.epoch, self.start, self.rows = 0, 0, None

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
            yield self.split.batch(order[b * self.batch_size:(b + 1) * self.batch_size])


def make_loader(data_dir, split, batch_size, shuffle, seed=0, drop_last=False):
    return Loader(Split(data_dir, split), batch_size, shuffle, seed, drop_last)


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
            print(f"train with: python train.py mac --data {args.out}")
        else:
            prepare(args.clevr_dir, args.out, args.images, args.size, args.vocab, args.features_dir)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
