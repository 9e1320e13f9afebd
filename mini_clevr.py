"""The built-in mini-CLEVR: a small CLEVR in CLEVR's own format, generated with numpy in seconds.

Scenes carry CLEVR's attributes (3 shapes, 8 colors, 2 sizes, 2 materials) and are drawn in 2-D, with
left/right/front/behind consistent with the picture; questions come from templates written for this
project (the question FAMILIES below) that cover CLEVR's five question kinds and its function set;
programs are in CLEVR's node format and answers come from data.execute, balanced per family.
Deterministic by seed: the same seed gives the same files, byte for byte.

    python prepare.py generate [--out DIR] [--tiny]     # writes it and prepares it (scene-CNN features)

train.py needs no command: data.ensure_builtin generates and prepares it on first use, into
$MINI_CLEVR_CACHE or ~/.cache/mini-clevr. The format facts (CLEVR's scene and question JSON,
clevr-dataset-gen's properties.json) are those of data.py's docstring.
"""
import json
import struct
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

from data import ATTR_ORDER, ATTRIBUTES, RELATIONS, DataError, IllPosed, execute

# Bumped whenever the built-in data changes, here or in how prepare.py prepares it (3: scene-CNN
# predictions as features; 4: the x, y channels give each object's centre, not its cell's); data.builtin_dir
# names its cache folder after it.
GENERATOR_VERSION = 4
BUILTIN = {  # sizes of the two built-in datasets
    "default": dict(train_images=5000, val_images=500, questions_per_image=20, image_size=48, max_objects=5),
    "tiny": dict(train_images=48, val_images=16, questions_per_image=5, image_size=32, max_objects=5),
}

# ------------------------------------------------------------------------------------------------
# Scenes: CLEVR's attributes in 2-D, drawn with numpy
# ------------------------------------------------------------------------------------------------

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


CLEVR_FRAME = (480, 320)  # CLEVR v1.0's image width and height (clevr-dataset-gen render_images.py)


def sample_clevr_scene(rng, index, split, min_objects=3, max_objects=10, frame=CLEVR_FRAME):
    """A random scene as the CLEVR release writes it: only CLEVR's own fields, `pixel_coords` (x, y,
    depth) in the W x H frame with depth the distance from the camera (smaller = nearer, CLEVR's
    convention), up to 10 objects. Objects may overlap and occlude each other; every pair is still
    MARGIN apart in x and in y, so left/right/front/behind stay unambiguous (CLEVR asks the same)."""
    W, H = frame
    n = int(rng.integers(min_objects, max_objects + 1))
    objects = []
    while len(objects) < n:
        obj = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
        r = RADIUS[obj["size"]] * min(W, H)
        x, y = rng.uniform(r, W - r), rng.uniform(r, H - r)
        if all(abs(x - o["x"]) >= MARGIN * H and abs(y - o["y"]) >= MARGIN * H for o in objects):
            objects.append(dict(obj, x=x, y=y, r=r, rotation=float(rng.uniform(0, 360))))
    rels = {rel: [[j for j, b in enumerate(objects) if j != i and {
        "left": b["x"] < a["x"], "right": b["x"] > a["x"],
        "front": b["y"] > a["y"], "behind": b["y"] < a["y"]}[rel]] for i, a in enumerate(objects)]
        for rel in RELATIONS}
    return {
        "split": split, "image_index": index, "image_filename": f"CLEVR_{split}_{index:06d}.png",
        "objects": [{
            "shape": o["shape"], "color": o["color"], "size": o["size"], "material": o["material"],
            "3d_coords": [round(6 * o["x"] / W - 3, 3), round(3 - 6 * o["y"] / H, 3), round(6 * o["r"] / H, 3)],
            "pixel_coords": [round(o["x"]), round(o["y"]), round(14 - 6 * o["y"] / H, 3)],
            "rotation": round(o["rotation"], 3)} for o in objects],
        "relationships": rels,
        "directions": {"left": [-1, 0, 0], "right": [1, 0, 0], "front": [0, -1, 0], "behind": [0, 1, 0],
                       "above": [0, 0, 1], "below": [0, 0, -1]},
    }


def render(scene, supersample=2, frame=None):
    """Draw a scene as (H, W, 3) uint8, a pure function of the scene dict; frame (W, H) defaults to the
    built-in's square (S, S), and radii are fractions of the shorter side. Cubes are squares,
    spheres discs, cylinders upright bodies with an elliptic cap; rubber is matte and evenly lit,
    metal is darker with a bright specular highlight. Supersampled for smooth edges."""
    W, H = frame or (scene["image_size"], scene["image_size"])
    S, ss = min(W, H), supersample
    n, m = H * ss, W * ss
    floor = 0.50 + 0.12 * (np.arange(n, dtype=np.float32) + 0.5) / n  # a floor lit from the front
    img = np.repeat(np.repeat(floor[:, None, None], m, axis=1), 3, axis=2)  # (n, m, 3)
    for obj in sorted(scene["objects"], key=lambda o: o["pixel_coords"][1]):  # back to front
        cx, cy = obj["pixel_coords"][0] * ss, obj["pixel_coords"][1] * ss
        r = RADIUS[obj["size"]] * S * ss
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, n)  # the object's bounding box
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, m)
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
    img = img.reshape(H, ss, W, ss, 3).mean(axis=(1, 3))  # (H, W, 3)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Questions: templates written for this project, one per question family
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# A split, and the whole dataset in CLEVR's layout
# ------------------------------------------------------------------------------------------------

def generate_split(rng, split, num_images, per_image, size, max_objects=5, clevr_layout=False):
    """Scenes and balanced questions for one split. Balancing (as CLEVR does per template):
    an answer is refused in a family once it is over-represented there, so the answer alone
    cannot be guessed from the family. clevr_layout: scenes of sample_clevr_scene (size unused)."""
    counts = [dict() for _ in FAMILIES]
    domains = [_answer_domain(f[0]) for f in FAMILIES]
    scenes, questions = [], []
    for index in range(num_images):
        scene = (sample_clevr_scene(rng, index, split, max_objects=max_objects) if clevr_layout
                 else sample_scene(rng, index, split, size, max_objects=max_objects))
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
    """A minimal PNG writer (8-bit RGB, or RGBA for (H, W, 4)), so that the built-in data needs no
    image library."""
    h, w, c = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6 if c == 4 else 2, 0, 0, 0))
    Path(path).write_bytes(png + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def read_png(path):
    """(H, W, 3) uint8 of an 8-bit RGB or RGBA PNG, not interlaced (CLEVR's and write_png's), with numpy
    and zlib alone: alpha is dropped. Any other PNG, or a damaged file, raises ValueError."""
    buf = Path(path).read_bytes()
    if buf[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, head = 8, [], None
    while pos + 8 <= len(buf):
        n, tag = struct.unpack(">I4s", buf[pos:pos + 8])
        if tag == b"IHDR":
            head = struct.unpack(">IIBBBBB", buf[pos + 8:pos + 21])
        elif tag == b"IDAT":
            idat.append(buf[pos + 8:pos + 8 + n])
        pos += 12 + n
    if head is None or head[2] != 8 or head[3] not in (2, 6) or head[6] != 0:
        raise ValueError(f"not an 8-bit RGB or RGBA PNG without interlacing (IHDR {head})")
    w, h, c = head[0], head[1], 3 if head[3] == 2 else 4
    try:
        rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * c)
    except (zlib.error, ValueError) as e:
        raise ValueError(f"damaged image data ({e})") from None
    return _unfilter(rows, c).reshape(h, w, c)[..., :3]


def _unfilter(rows, c):
    """PNG's per-row filters undone (None, Sub, Up, Average, Paeth): (h, 1 + w*c) -> (h, w*c) uint8.
    None, Sub and Up with numpy; Average and Paeth depend on the pixel just undone, so they run byte
    by byte in Python (a few tenths of a second for a 480 x 320 RGBA image of Paeth rows; Pillow, when
    installed, is what prepare.read_rgb uses)."""
    out = np.zeros((rows.shape[0], rows.shape[1] - 1), np.uint8)
    prev = np.zeros(out.shape[1], np.uint8)
    for y, kind in enumerate(rows[:, 0]):
        line = rows[y, 1:]
        if kind == 0:
            out[y] = line
        elif kind == 1:
            out[y] = np.cumsum(line.reshape(-1, c), axis=0, dtype=np.uint8).reshape(-1)  # wraps mod 256
        elif kind == 2:
            out[y] = line + prev  # uint8: mod 256
        elif kind in (3, 4):
            out[y] = np.frombuffer(_unfilter_sequential(kind, bytearray(line.tobytes()), prev.tobytes(), c), np.uint8)
        else:
            raise ValueError(f"unknown PNG filter {kind}")
        prev = out[y]
    return out


def _unfilter_sequential(kind, line, prev, c):
    """One row of PNG's Average (3) or Paeth (4) filter undone in place (bytes, as Python ints)."""
    for x in range(len(line)):
        a, d = (line[x - c], prev[x - c]) if x >= c else (0, 0)
        b = prev[x]
        if kind == 3:
            line[x] = (line[x] + ((a + b) >> 1)) & 255
            continue
        pa, pb, pc = abs(b - d), abs(a - d), abs(a + b - 2 * d)  # |p - a|, |p - b|, |p - d| with p = a + b - d
        line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else d)) & 255
    return line


# What generate can honour: size -> (lowest, highest or None, why), checked before anything is written
LIMITS = {
    "train_images": (16, None, "preview.png shows the first 16"),
    "val_images": (1, None, "the val split needs an image"),
    "questions_per_image": (1, 3 * len(FAMILIES), f"at most 3 tries of each of the {len(FAMILIES)} question "
                                                  "families per image; near the top, images get fewer"),
    "image_size": (8, None, "the scene CNN's features have one cell per 8 x 8 pixels"),
    # sample_scene places objects by rejection: 12 objects took about 0.16 s a scene, 15 none in 20 s
    "max_objects": (3, 10, "a scene has 3 objects at least; past 10, placing them apart slows sharply"),
}


def check_sizes(cfg, seed=0):
    """A DataError, naming the command-line flag and its valid range, for a size generate cannot honour."""
    for key, (low, high, why) in LIMITS.items():
        v = cfg[key]
        if type(v) is not int or v < low or (high is not None and v > high) or (key == "image_size" and v % 8):
            valid = f"from {low} to {high}" if high is not None else f"{low} or more"
            valid = f"a multiple of 8, {valid}" if key == "image_size" else valid
            raise DataError(f"--{key.replace('_', '-')} {v}: must be {valid} ({why})")
    if type(seed) is not int or seed < 0:
        raise DataError(f"--seed {seed}: must be 0 or more")


def _write_release_pngs(folder, scenes):
    """Each scene as CLEVR's PNG: CLEVR_FRAME (480 x 320), RGBA with an opaque alpha as Blender writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        rgb = render(scene, frame=CLEVR_FRAME)  # (320, 480, 3)
        write_png(folder / scene["image_filename"], np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))


def generate(out, tiny=False, seed=0, log=print, clevr_layout=False, **sizes):
    """Write the built-in mini-CLEVR in CLEVR's layout: questions/ and scenes/ as in the release,
    images/{split}.h5 (dataset `images`, (N, S, S, 3) uint8: no image library needed) and a
    preview.png of the first training images. `sizes` (None: the built-in's) must be in LIMITS.
    clevr_layout: the images as the release has them instead, 480 x 320 RGBA PNGs
    images/{split}/CLEVR_{split}_NNNNNN.png, of sample_clevr_scene's scenes (CLEVR's own fields only,
    overlap allowed; image_size is then unused), and no preview.png."""
    cfg = dict(BUILTIN["tiny" if tiny else "default"], **{k: v for k, v in sizes.items() if v is not None})
    check_sizes(cfg, seed)
    out = Path(out)
    for sub in ("questions", "scenes", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0, split_questions = time.time(), {}
    for split_id, split in enumerate(("train", "val")):
        rng = np.random.default_rng([seed, split_id])
        scenes, questions = generate_split(rng, split, cfg[f"{split}_images"], cfg["questions_per_image"],
                                           cfg["image_size"], cfg["max_objects"], clevr_layout)
        info = {"split": split, "version": "mini-clevr-%d" % GENERATOR_VERSION, "seed": seed}
        (out / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"info": info, "scenes": scenes}))
        (out / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps({"info": info, "questions": questions}))
        split_questions[split] = questions
        log(f"  {split}: {len(scenes)} images, {len(questions)} questions")
        if clevr_layout:
            _write_release_pngs(out / "images" / split, scenes)
            continue
        images = np.stack([render(s) for s in scenes])  # (N, S, S, 3)
        with h5py.File(out / "images" / f"{split}.h5", "w") as f:
            f.create_dataset("images", data=images)
        if split == "train":
            grid = images[:16].reshape(4, 4, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
            write_png(out / "preview.png", grid.reshape(4 * images.shape[1], 4 * images.shape[2], 3))
    base = majority_baseline(split_questions["train"], split_questions["val"])
    log(f"generated mini-CLEVR in {time.time() - t0:.0f}s -> {out}; "
        f"majority-answer-per-family baseline on val: {100 * base:.1f}%")
    return base
