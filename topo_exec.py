"""Batched topological execution of program trees, against per-example execution.

Paper: J. Suarez, C. Zhu, "Fast and CLEVR Visual Reasoning Programs via Improved Topologically
Batched Graph Execution", poster, 2017 (no arXiv id; text in ../shared/papers/fast-clevr-topological-batching.md).
Official code: jsuarez5341/Efficient-Dynamic-Batching. The modules it executes are those of the
execution engine of J. Johnson et al., "Inferring and Executing Programs for Visual Reasoning",
ICCV 2017, arXiv:1705.03633 (facebookresearch/clevr-iep).

In the paper's order: clevr-iep's modules (`make_bank`, pg_ee.py's too); the per-example executor
(`run_naive`, one call per node: the paper's "Vanilla"); the plan (`make_plan`: index tensors made before
execution); the topological executor (`run_topo`: one call per (height, module) group: the paper's
"Improved Topological Sort"; `Regather`: no more memory than per-example execution). Beyond the
paper, at the end: the `agenda` schedule and `run_level`.

    python topo_exec.py                       # tiny smoke run: every executor agrees, call counts
    python bench.py topo [--batch-sizes 1 8 64 ...] [--device cpu|cuda] [--json FILE]   # the benchmark

Shapes (the paper's bounds use b = B, p, s and d):
    B  programs (= images) in the batch     N  nodes in the batch     n  nodes in one group
    C  channels of a module's feature map   H, W  feature-map size (14 x 14 for ResNet conv4)
    d  levels (max height + 1)              p  distinct modules used by the batch
    s  longest program                      m_c  nodes of one architecture at one level (run_level)

Schedules (REFERENCE.md, "Topological batched execution"); naive execution makes N <= B * s calls,
the paper's Vanilla O(b s):
    height     level of a node = 0 for a leaf, 1 + max child height otherwise: calls <= d * p   (O(p d))
    postorder  level = the node's post-order index in its program, as the official code ranks nodes
               (FastExecutioner, HighArcESort): levels = longest program, calls grow with length (O(p s))
"""
import collections
import contextlib
import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data

SCENE = "scene"

# ------------------------------------------------------------------------------------------------
# Programs: prefix tokens, read leniently as clevr-iep reads them
# ------------------------------------------------------------------------------------------------

def clean(tokens):
    """Prefix tokens without the specials: a leading <START> is dropped, and everything from the first
    <END> or <NULL> on is padding. Accepts any sequence of strings."""
    # NOTE (deviation): clevr-iep reads <NULL> as `scene` (as here: padding past the end) but runs
    # a module of its own for an <END> met inside an unfinished program; here <END> ends the program.
    tokens = list(tokens)
    if tokens and tokens[0] == "<START>":
        tokens = tokens[1:]
    for stop in ("<END>", "<NULL>"):
        if stop in tokens:
            tokens = tokens[:tokens.index(stop)]
    return tokens


def module_key(bank, token):
    """The bank entry of a token: the token itself (`filter_color[red]`, clevr-iep: one module per
    token) or else its function (`filter_color`)."""
    if token in bank:
        return token
    fn = data.token_function(token)
    if fn in bank:
        return fn
    raise KeyError(f"no module for program token {token!r} (nor for its function {fn!r}) in the module bank")


@functools.lru_cache(maxsize=1 << 16)
def parse(tokens):
    """Prefix tokens (a tuple) -> the nodes in prefix order, as a tuple of
    (token, child node ids, height, post-order index). A program that ends early is completed with
    `scene` leaves and tokens after the root's subtree are ignored: clevr-iep's rule, so that sampled
    (possibly malformed) programs still execute. Both executors read programs this way."""
    tokens = clean(tokens)
    toks, kids, height, post = [], [], [], []

    def visit(j):  # -> (node id, next token position)
        nonlocal done
        me = len(toks)
        token = tokens[j] if j < len(tokens) else SCENE  # clevr-iep: past the end reads as `scene`
        toks.append(token), kids.append([]), height.append(0), post.append(0)
        j += 1
        for _ in range(data.arity(token)):
            child, j = visit(j)
            kids[me].append(child)
        height[me] = 1 + max(height[c] for c in kids[me]) if kids[me] else 0  # the improved sort's level
        post[me], done = done, done + 1
        return me, j
    done = 0  # nodes finished so far = the next post-order index
    visit(0)
    return tuple(zip(toks, map(tuple, kids), height, post))


def decode(program, idx_to_token):
    """(B, L) long program tensor (clevr-iep layout, prefix) -> B token lists for the executors."""
    return [[idx_to_token[i] for i in row] for row in program.tolist()]


# ------------------------------------------------------------------------------------------------
# The modules: clevr-iep's execution engine (Johnson et al.), what the paper batches
# ------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """clevr-iep's unary (and scene) module: conv3x3, ReLU, conv3x3, + identity, ReLU (REFERENCE.md)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (n, C, H, W) -> (n, C, H, W)
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ConcatBlock(nn.Module):
    """clevr-iep's binary module: concat -> conv1x1 2C->C + ReLU -> residual block (REFERENCE.md)."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(2 * c, c, 1)
        self.res = ResBlock(c)

    def forward(self, x, y):  # (n, C, H, W) twice -> (n, C, H, W)
        return self.res(F.relu(self.proj(torch.cat([x, y], 1))))  # (n, 2C, H, W) -> (n, C, H, W)


def make_bank(tokens, channels):
    """One module per program token, as clevr-iep's execution engine."""
    return nn.ModuleDict({t: ConcatBlock(channels) if data.arity(t) == 2 else ResBlock(channels)
                          for t in sorted(set(tokens) | {SCENE})})


# ------------------------------------------------------------------------------------------------
# The naive executor: one Python recursion per example, one module call per node (clevr-iep)
# ------------------------------------------------------------------------------------------------

def run_naive(programs, bank, feats):
    """Per-example recursive execution, as clevr-iep's ModuleNet._forward_modules_ints_helper.

    programs: B prefix token lists; bank: token or function -> nn.Module (arity 0 modules take the
    image's features, unary (x,), binary (x, y)); feats: (B, C, H, W). Returns the roots (B, C, H, W)."""
    outs = []
    for i, tokens in enumerate(programs):
        tokens = clean(tokens)

        def execute(j):  # -> (output (1, C, H, W), next token position)
            token = tokens[j] if j < len(tokens) else SCENE
            module = bank[module_key(bank, token)]
            if data.arity(token) == 0:
                return module(feats[i:i + 1]), j + 1  # (1, C, H, W), a view of this image's features
            args, j = [], j + 1
            for _ in range(data.arity(token)):
                x, j = execute(j)
                args.append(x)
            return module(*args), j
        outs.append(execute(0)[0])
    return torch.cat(outs)  # (B, C, H, W)


# ------------------------------------------------------------------------------------------------
# The plan: the schedule of one batch as index tensors, computed once before execution
# ------------------------------------------------------------------------------------------------

def num_inputs(key):
    """Inputs of a bank entry: `scene` takes its image's features, every other module its children."""
    return max(data.arity(key), 1)


def bank_classes(bank):
    """Bank keys grouped by architecture (number of inputs, module class, parameter shapes), each list
    sorted: modules of one class can run as one batched call with their weights stacked (run_level)."""
    classes = {}
    for key in sorted(bank.keys()):
        module = bank[key]
        shapes = tuple((name, tuple(p.shape)) for name, p in module.named_parameters())
        classes.setdefault((num_inputs(key), type(module).__qualname__, shapes), []).append(key)
    return classes


@dataclass
class Level:
    """One step of execution. Its input X = cat(inbox).index_select(0, gather) is laid out class by
    class (modules of one architecture), input slot by input slot, group by group; its output is one
    tensor per group, whose rows `route` sends on."""
    groups: list = field(default_factory=list)  # (module key, positions of its inputs in X.split(arg_sizes))
    sizes: list = field(default_factory=list)  # nodes of each group
    arg_sizes: list = field(default_factory=list)  # rows of each input chunk of X (one per group and slot)
    classes: list = field(default_factory=list)  # (class, nodes m_c, groups, (m_c,) module of each node), for run_level
    gather: torch.Tensor = None  # (rows of X,) long, or None when the inbox arrives in X's order
    route: list = None  # (group, destination level, (rows,) long or None = all rows in order)


@dataclass
class Plan:
    """The schedule of one batch of programs: every index tensor of the run, made before it runs.
    `calls` = module calls of run_topo = number of (level, module) groups."""
    batch_size: int
    num_nodes: int
    schedule: str
    feed: list  # route of the image features (B, C, H, W) to the levels holding the leaves
    levels: list
    root_gather: torch.Tensor  # (B,) long: row of each program's root in cat(root inbox), or None

    @property
    def calls(self):
        return sum(len(level.groups) for level in self.levels)

    @property
    def level_calls(self):
        """Module calls of run_level: one per (level, architecture)."""
        return sum(len(level.classes) for level in self.levels)

    @property
    def depth(self):
        return len(self.levels)


def _index(rows, device):
    return torch.tensor(rows, dtype=torch.long, device=device)


def make_plan(programs, bank, schedule="height", device="cpu"):
    """Group all nodes of a batch by (level, module) and precompute every index tensor of the run.

    programs: B prefix token lists; bank: as in run_naive (its keys and parameter shapes are read);
    schedule: a key of SCHEDULES: "height" (the improved sort, levels = max height + 1), "postorder"
    (the official code's ranks, levels = longest program) or "agenda" (beyond the paper, at the end)."""
    assert schedule in SCHEDULES, schedule
    nodes = batch_nodes(programs, bank, schedule)
    levels, placed, feed_items = lay_out(nodes, bank, device)
    feed, root_gather = connect(levels, nodes, placed, feed_items, len(programs), device)
    return Plan(len(programs), len(nodes["keys"]), schedule, feed, levels, root_gather)


# schedule -> level of each node, from (bank keys, children, heights, post-order indices) of the batch
SCHEDULES = {"height": lambda keys, kids, heights, posts: heights,  # O(p d) calls
             "postorder": lambda keys, kids, heights, posts: posts}  # O(p s) calls


def batch_nodes(programs, bank, schedule):
    """Step 1: the nodes of the whole batch, program after program, each in prefix order (root first):
    their bank keys, children, levels, programs, and whether each is its program's root."""
    keys, kids, heights, posts, example, is_root = [], [], [], [], [], []
    key_cache = {}
    for b, tokens in enumerate(programs):
        base = len(keys)
        for token, children, height, post in parse(tuple(tokens)):
            if token not in key_cache:
                key_cache[token] = module_key(bank, token)
            keys.append(key_cache[token])
            kids.append([base + c for c in children])
            heights.append(height), posts.append(post)
            example.append(b)
            is_root.append(len(keys) == base + 1)
    level_of = SCHEDULES[schedule](keys, kids, heights, posts)
    return {"keys": keys, "kids": kids, "level_of": level_of, "example": example, "is_root": is_root}


def lay_out(nodes, bank, device):
    """Step 2, the layout: node k is row out_row[k] of group out_group[k]; child c feeds row dest[c] of its
    parent's X; a leaf reads its image's features (feed_items: (level, row of X, image)).
    -> (levels without routes and gathers, (out_group, out_row, dest), feed_items)."""
    keys, kids, level_of, example = nodes["keys"], nodes["kids"], nodes["level_of"], nodes["example"]
    num_nodes, num_levels = len(keys), max(level_of) + 1
    classes = bank_classes(bank)
    class_of = {key: cls for cls, ks in classes.items() for key in ks}
    members = [{} for _ in range(num_levels)]  # level -> module key -> node ids
    for k in range(num_nodes):
        members[level_of[k]].setdefault(keys[k], []).append(k)
    out_group, out_row, dest, feed_items, levels = [0] * num_nodes, [0] * num_nodes, {}, [], []
    for h in range(num_levels):
        level, x_row = Level(), 0
        for cls in sorted({class_of[key] for key in members[h]}):
            group_keys = [key for key in classes[cls] if key in members[h]]
            sizes = [len(members[h][key]) for key in group_keys]
            m, slots, first_chunk = sum(sizes), cls[0], len(level.arg_sizes)
            level.arg_sizes += sizes * slots
            ids, offset = [], 0
            for g, key in enumerate(group_keys):
                level.groups.append((key, [first_chunk + j * len(sizes) + g for j in range(slots)]))
                ids += [classes[cls].index(key)] * sizes[g]
                for i, k in enumerate(members[h][key]):
                    out_group[k], out_row[k] = len(level.groups) - 1, i
                    if not kids[k]:  # a leaf reads its image's features
                        feed_items.append((h, x_row + offset + i, example[k]))
                    for j, c in enumerate(kids[k]):
                        dest[c] = (h, x_row + j * m + offset + i)
                offset += sizes[g]
            level.sizes += sizes
            level.classes.append((cls, m, len(sizes), _index(ids, device)))
            x_row += slots * m
        levels.append(level)
    return levels, (out_group, out_row, dest), feed_items


def connect(levels, nodes, placed, feed_items, batch_size, device):
    """Steps 3 and 4: the routes, in the order run_topo sends (features, then level by level, group by
    group; each chunk goes to one level, its rows sorted as they sit there; roots go to the last inbox),
    and the gathers (the permutation from arrival order to row order, per level and for the roots).
    Sets each level's route and gather; -> (the features' route, the roots' gather)."""
    (out_group, out_row, dest), num_levels = placed, len(levels)
    arrivals = [[] for _ in range(num_levels + 1)]  # per destination: its rows in arrival order

    def route(items, sizes):  # items per source group: (destination level, destination row, source row)
        chunks = []
        for g, group_items in enumerate(items):
            for to, run in itertools.groupby(sorted(group_items), key=lambda item: item[0]):
                run = list(run)
                rows = [src for _, _, src in run]
                chunks.append((g, to, None if rows == list(range(sizes[g])) else _index(rows, device)))
                arrivals[to] += [row for _, row, _ in run]
        return chunks
    sent = [[[] for _ in level.groups] for level in levels]
    for k in range(len(nodes["keys"])):
        item = (num_levels, nodes["example"][k]) if nodes["is_root"][k] else dest[k]
        sent[nodes["level_of"][k]][out_group[k]].append((*item, out_row[k]))
    feed = route([feed_items], [batch_size])
    for h, level in enumerate(levels):
        level.route = route(sent[h], level.sizes)

    def gather(arrived):
        order = [0] * len(arrived)
        for pos, row in enumerate(arrived):
            order[row] = pos
        return None if order == list(range(len(order))) else _index(order, device)
    for h, level in enumerate(levels):
        level.gather = gather(arrivals[h])
    return feed, gather(arrivals[num_levels])


# ------------------------------------------------------------------------------------------------
# The topological executor: one call per (level, module)
# ------------------------------------------------------------------------------------------------

class Regather:
    """Saved-tensor hooks that keep, instead of a gathered copy, the recipe to gather it again.

    A level's input X copies rows autograd keeps anyway (features, ReLU outputs), so saving X would
    hold one tensor per node more than per-example execution. While a level runs, `pack` replaces each
    saved view of a registered tensor (X, run_level's gathered weights) by (recipe, offset, size,
    stride); backward gathers it again, one level at a time. Modules must not modify inputs in place."""

    def __init__(self, enabled=True):
        self.enabled, self.recipes, self.cache, self.pending = enabled, {}, {}, {}

    def register(self, t, recipe):
        """recipe() = t again, without autograd; None: t is not a copy (nothing to save)."""
        if self.enabled and recipe is not None:
            self.recipes[t.untyped_storage().data_ptr()] = (t, t._version, recipe)

    @contextlib.contextmanager
    def hooks(self):
        if not self.enabled:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
        if any(t._version != version for t, version, _ in self.recipes.values()):
            raise RuntimeError("a module modified its input in place: pass regather=False")
        self.recipes = {}

    def pack(self, t):
        entry = self.recipes.get(t.untyped_storage().data_ptr())
        if entry is None:
            return t
        recipe = entry[2]
        self.pending[recipe] = self.pending.get(recipe, 0) + 1
        return recipe, t.storage_offset(), t.size(), t.stride()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, offset, size, stride = packed
        if recipe not in self.cache:
            with torch.no_grad():
                self.cache = {recipe: recipe()}  # one level's copy at a time
        x = self.cache[recipe].as_strided(size, stride, offset)
        self.pending[recipe] -= 1
        if self.pending[recipe] <= 0:  # its last saved view is unpacked: free the copy now
            self.cache.pop(recipe)
        return x


def _send(route, sources, inbox):
    """Append each chunk (rows, C, H, W) of the route to its destination's inbox, with its recipe."""
    for g, to, index in route:
        src = sources[g]
        inbox[to].append((src if index is None else src.index_select(0, index), src.detach(), index))


def _receive(chunks, gather):
    """An inbox -> (X, recipe): X (rows, C, H, W) in row order; recipe() rebuilds X from the detached sources."""
    def assemble(parts):
        x = parts[0] if len(parts) == 1 else torch.cat(parts)  # (rows, C, H, W) in arrival order
        return x if gather is None else x.index_select(0, gather)  # (rows, C, H, W) in row order

    sources = [(src, index) for _, src, index in chunks]  # not the chunks: the recipe must not keep them

    def recipe():
        return assemble([src if index is None else src.index_select(0, index) for src, index in sources])
    x = assemble([chunk for chunk, _, _ in chunks])
    fresh = len(chunks) > 1 or gather is not None or chunks[0][2] is not None  # else x is a source itself
    return x, (recipe if fresh else None)


def run_topo(plan, bank, feats, regather=True):
    """Execute a planned batch: one module call per (level, module) group. feats: (B, C, H, W).
    Returns the roots (B, C, H, W), equal to run_naive's up to float rounding. regather: gather the
    levels' inputs again in backward rather than keep them (memory as per-example execution)."""
    lean = Regather(regather and torch.is_grad_enabled())
    inbox = [[] for _ in range(plan.depth + 1)]
    _send(plan.feed, [feats], inbox)
    for h, level in enumerate(plan.levels):
        x, recipe = _receive(inbox[h], level.gather)  # (rows of X, C, H, W)
        inbox[h] = None  # the chunks can go once their rows are in X
        args = x.split(level.arg_sizes)  # (n, C, H, W) per group and input slot
        lean.register(x, recipe)
        with lean.hooks():
            outs = [bank[key](*[args[a] for a in slots]) for key, slots in level.groups]  # (n, C, H, W) each
        _send(level.route, outs, inbox)
    return _receive(inbox[-1], plan.root_gather)[0]  # (B, C, H, W)


# Every executor by name (bench.py, the smoke run): name -> (schedule of its plan, or None; run function)
EXECUTORS = {
    "naive": (None, lambda plan, programs, bank, feats: run_naive(programs, bank, feats)),
    "topo": ("height", lambda plan, programs, bank, feats: run_topo(plan, bank, feats)),
    "postorder": ("postorder", lambda plan, programs, bank, feats: run_topo(plan, bank, feats)),
}


# ---- beyond the paper ----
# agenda: one module per level, chosen greedily among ready nodes (DyNet's autobatching agenda, Neubig et al. 2017)
def agenda_levels(keys, kids):
    """Level of each node (nodes in prefix order, a parent before its children); a node may wait past
    its height to join a later call of its module, so calls fall below height's. Each level runs one
    module on all its ready nodes (children done), chosen: a module whose every remaining node is ready
    first, then the one whose ready nodes are farthest from their root, then the one with most ready
    nodes. Calls >= the sum over modules of the most nodes of it on one root-to-leaf path (RESULTS.md's
    "floor")."""
    n = len(keys)
    parent, to_root = [-1] * n, [0] * n
    for k in range(n):
        for c in kids[k]:
            parent[c], to_root[c] = k, to_root[k] + 1
    waiting = [len(c) for c in kids]  # children not yet run
    remaining = collections.Counter(keys)  # module -> its nodes not yet run
    ready = {}  # module -> its nodes whose children have run
    for k in range(n):
        if not kids[k]:
            ready.setdefault(keys[k], []).append(k)
    level_of = [0] * n
    for level in itertools.count():
        if not ready:
            return level_of
        key = max(ready, key=lambda m: (len(ready[m]) == remaining[m], max(to_root[k] for k in ready[m]),
                                        len(ready[m]), m))
        nodes = ready.pop(key)
        remaining[key] -= len(nodes)
        for k in nodes:
            level_of[k] = level
            p = parent[k]
            if p >= 0:
                waiting[p] -= 1
                if waiting[p] == 0:
                    ready.setdefault(keys[p], []).append(p)


SCHEDULES["agenda"] = lambda keys, kids, heights, posts: agenda_levels(keys, kids)


# run_level: one call per (level, architecture), each node running its own module's gathered weights
def run_level(plan, bank, feats, regather=True):
    """As run_topo, but all modules of one architecture at a level run as one call: the modules' weights
    are stacked (p, ...), each node's gathered (m_c, ...), and torch.func.vmap runs the module over the
    nodes. Gathering weights costs time and, without regather, memory (a weight copy per node)."""
    stacks = {}  # class -> (template module, {parameter name: (its tensor in each module, them stacked (p, ...))})
    for cls, keys in bank_classes(bank).items():
        params = [dict(bank[key].named_parameters()) for key in keys]
        if any(True for _ in bank[keys[0]].buffers()):
            raise ValueError(f"run_level needs modules without buffers (no BatchNorm): {keys[0]}")
        stacks[cls] = (bank[keys[0]], {name: ([p[name] for p in params], torch.stack([p[name] for p in params]))
                                       for name in params[0]})

    def regather_weights(tensors, ids):  # the recipe of a gathered weight: stack and gather again
        return lambda: torch.stack([t.detach() for t in tensors]).index_select(0, ids)

    def one_node(template, weights, *xs):  # xs: (C, H, W) each -> (C, H, W)
        return torch.func.functional_call(template, weights, tuple(x[None] for x in xs))[0]

    lean = Regather(regather and torch.is_grad_enabled())
    inbox = [[] for _ in range(plan.depth + 1)]
    _send(plan.feed, [feats], inbox)
    for h, level in enumerate(plan.levels):
        x, recipe = _receive(inbox[h], level.gather)  # (rows of X, C, H, W)
        inbox[h] = None
        args = x.split([m for cls, m, _, _ in level.classes for _ in range(cls[0])])  # (m_c, C, H, W) per slot
        lean.register(x, recipe)
        weights = []
        for cls, m, _, ids in level.classes:
            stacked = stacks[cls][1]
            weights.append({name: w.index_select(0, ids) for name, (_, w) in stacked.items()})  # (m_c, ...) each
            for name, w in weights[-1].items():
                lean.register(w, regather_weights(stacked[name][0], ids))
        outs, a, g = [], 0, 0
        with lean.hooks():
            for (cls, m, num_groups, ids), w in zip(level.classes, weights):
                batched = torch.func.vmap(functools.partial(one_node, stacks[cls][0]))
                y = batched(w, *args[a:a + cls[0]])  # (m_c, C, H, W)
                outs += y.split(level.sizes[g:g + num_groups])  # (n, C, H, W) per group, as run_topo's
                a, g = a + cls[0], g + num_groups
        _send(level.route, outs, inbox)
    return _receive(inbox[-1], plan.root_gather)[0]  # (B, C, H, W)


EXECUTORS.update({"agenda": ("agenda", lambda plan, programs, bank, feats: run_topo(plan, bank, feats)),
                  "level": ("height", lambda plan, programs, bank, feats: run_level(plan, bank, feats))})


# ------------------------------------------------------------------------------------------------
# Programs of the built-in generator to run, and a smoke run
# ------------------------------------------------------------------------------------------------

def clevr_programs(num_images, seed=0):
    """Prefix programs of the built-in mini-CLEVR generator's questions (10 per image)."""
    import mini_clevr  # the generator: imported when used
    _, questions = mini_clevr.generate_split(np.random.default_rng(seed), "train", num_images, 10, 64)
    return [data.list_to_prefix(q["program"]) for q in questions]


def smoke(batch_size=24, channels=4, size=6, seed=0, log=print):
    """Tiny float64 bank: every executor's roots and gradients equal the naive executor's."""
    torch.manual_seed(seed)
    programs = clevr_programs(4, seed)[:batch_size]
    bank = make_bank([t for p in programs for t in p], channels).double()
    feats = torch.randn(len(programs), channels, size, size, dtype=torch.float64, requires_grad=True)
    probe = torch.randn_like(feats)
    inputs = [feats] + list(bank.parameters())
    ref = run_naive(programs, bank, feats)
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    nodes = sum(len(parse(tuple(p))) for p in programs)  # naive: one call per node
    for name, (schedule, run) in EXECUTORS.items():
        plan = make_plan(programs, bank, schedule, feats.device) if schedule else None
        calls = nodes if plan is None else plan.level_calls if name == "level" else plan.calls
        out = run(plan, programs, bank, feats)
        grads = torch.autograd.grad((out * probe).sum(), inputs)
        diff = max((a - b).abs().max().item() for a, b in zip([out, *grads], [ref, *ref_grads]))
        log(f"{name:<10} module calls {calls:>4}, max |difference from naive| (roots and gradients) {diff:.1e}")
        assert diff < 1e-9, name


if __name__ == "__main__":
    smoke()
