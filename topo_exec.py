"""Batched topological execution of program trees, against per-example execution, with its benchmark.

Paper: J. Suarez, C. Zhu, "Fast and CLEVR Visual Reasoning Programs via Improved Topologically
Batched Graph Execution", poster, 2017 (no arXiv id; text in ../shared/papers/fast-clevr-topological-batching.md).
Official code: jsuarez5341/Efficient-Dynamic-Batching. The modules it executes are those of the
execution engine of J. Johnson et al., "Inferring and Executing Programs for Visual Reasoning",
ICCV 2017, arXiv:1705.03633 (facebookresearch/clevr-iep).

This file holds the per-example executor (`run_naive`: a Python recursion over each program's prefix
tokens, one module call per node, as clevr-iep runs it); the plan (`make_plan`: the schedule of one
batch as index tensors, made once before execution so its cost can be measured on its own); the
topological executor (`run_topo`: all nodes of the batch grouped by (height, module), one call per
group, rows moved between levels with index_select / split / cat); going further, `run_level` (one
call per level and architecture, each node running its own module's gathered weights); and
`python topo_exec.py bench`, which measures them side by side.

Memory: a level's input is a gathered copy of its children's outputs. Autograd keeps those outputs
anyway, so keeping the copy too would cost one tensor per node more than per-example execution;
`Regather` drops the copies and gathers them again in backward (regather=True, the default).

    python topo_exec.py                       # tiny smoke run: both executors agree, call counts
    python topo_exec.py bench [--json FILE] [--batch-sizes 1 8 64 ...] [--device cpu|cuda]

Shapes:
    B  programs (= images) in the batch     N  nodes in the batch     n  nodes in one group
    C  channels of a module's feature map   H, W  feature-map size (14 x 14 for ResNet conv4)
    d  levels (max height + 1)              p  distinct modules used by the batch
    s  longest program                      m_c  nodes of one architecture at one level (run_level)

Schedules (REFERENCE.md, "Topological batched execution"):
    height     level of a node = 0 for a leaf, 1 + max child height otherwise: calls <= d * p   (O(p d))
    postorder  level = the node's post-order index in its program, as the official code ranks nodes
               (FastExecutioner, HighArcESort): levels = longest program, calls grow with length (O(p s))
    agenda     not in the paper: one module per level, chosen greedily among the nodes whose children
               have run (the agenda of DyNet's autobatching, Neubig et al. 2017): a node may wait past
               its height to join a later call of its module, so calls fall below height's
"""
import argparse
import collections
import contextlib
import ctypes
import dataclasses
import functools
import itertools
import json
import time
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
        height[me] = 1 + max(height[c] for c in kids[me]) if kids[me] else 0
        post[me], done = done, done + 1
        return me, j
    done = 0  # nodes finished so far = the next post-order index
    visit(0)
    return tuple(zip(toks, map(tuple, kids), height, post))


def decode(program, idx_to_token):
    """(B, L) long program tensor (clevr-iep layout, prefix) -> B token lists for the executors."""
    return [[idx_to_token[i] for i in row] for row in program.tolist()]


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


def agenda_levels(keys, kids):
    """The agenda schedule: level of each node, one module per level. Nodes in prefix order (a parent
    before its children). Each level runs one module on all its ready nodes (children done), chosen:
    a module whose every remaining node is ready (it will never need another call) first, then the
    one whose ready nodes are farthest from their root (the longest chain still to run), then the
    one with most ready nodes. No schedule of one module per call can make fewer calls than the sum,
    over modules, of the most nodes of it on one root-to-leaf path (those run one after another); the
    README compares the two."""
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


def make_plan(programs, bank, schedule="height", device="cpu"):
    """Group all nodes of a batch by (level, module) and precompute every index tensor of the run.

    programs: B prefix token lists; bank: as in run_naive (its keys and parameter shapes are read);
    schedule: "height" (the improved sort, levels = max height + 1), "postorder" (the official
    code's ranks, levels = longest program) or "agenda" (one module per level, see agenda_levels)."""
    assert schedule in ("height", "postorder", "agenda"), schedule
    # 1. the nodes of the whole batch, program after program, each in prefix order (root first)
    keys, kids, level_of, example, is_root = [], [], [], [], []
    key_cache = {}
    for b, tokens in enumerate(programs):
        base = len(keys)
        for token, children, height, post in parse(tuple(tokens)):
            if token not in key_cache:
                key_cache[token] = module_key(bank, token)
            keys.append(key_cache[token])
            kids.append([base + c for c in children])
            level_of.append(height if schedule == "height" else post)
            example.append(b)
            is_root.append(len(keys) == base + 1)
    if schedule == "agenda":
        level_of = agenda_levels(keys, kids)
    num_nodes, num_levels = len(keys), max(level_of) + 1

    # 2. layout: node k is row out_row[k] of group out_group[k]; child c feeds row dest[c] of its parent's X
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

    # 3. routes, in the order run_topo sends: features, then level by level, group by group; each
    #    chunk goes to one level, its rows sorted as they sit there. Roots go to the last inbox.
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
    for k in range(num_nodes):
        item = (num_levels, example[k]) if is_root[k] else dest[k]
        sent[level_of[k]][out_group[k]].append((*item, out_row[k]))
    feed = route([feed_items], [len(programs)])
    for h, level in enumerate(levels):
        level.route = route(sent[h], level.sizes)

    # 4. gathers: the permutation from arrival order to row order, per level and for the roots
    def gather(arrived):
        order = [0] * len(arrived)
        for pos, row in enumerate(arrived):
            order[row] = pos
        return None if order == list(range(len(order))) else _index(order, device)
    for h, level in enumerate(levels):
        level.gather = gather(arrivals[h])
    return Plan(len(programs), num_nodes, schedule, feed, levels, gather(arrivals[num_levels]))


# ------------------------------------------------------------------------------------------------
# The topological executor: one call per (level, module)
# ------------------------------------------------------------------------------------------------

class Regather:
    """Saved-tensor hooks that keep, instead of a gathered copy, the recipe to gather it again.

    A level's input X is a copy of rows that autograd keeps anyway (the features, and the outputs
    of modules that end in a ReLU, as clevr-iep's do; other outputs are held for the recipe instead
    of X, never more), so saving X for backward would hold one tensor per node more than per-example
    execution does. While a level runs, `pack` replaces every saved view of a registered tensor (X,
    run_level's gathered weights) by (recipe, offset, size, stride); backward gathers it again, one
    level at a time. Modules must not modify their inputs in place (checked)."""

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


# ------------------------------------------------------------------------------------------------
# Going further: one call per (level, architecture), each node running its own module's weights
# ------------------------------------------------------------------------------------------------

def run_level(plan, bank, feats, regather=True):
    """As run_topo, but all modules of one architecture at a level run as one batched call: the
    weights of every module are stacked (p, ...), each node's are gathered (m_c, ...), and torch.func.vmap
    runs the module once over the nodes (a convolution with per-node weights becomes a grouped one).
    Calls no longer grow with the number of modules; gathering the weights costs time and, without
    regather, memory (a copy of the module's weights per node)."""
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


# ------------------------------------------------------------------------------------------------
# Benchmark: an IEP-sized module bank on CLEVR-shaped programs, every executor side by side
# ------------------------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    batch_sizes: tuple = ()  # default: 1 8 64 256 512 1024 on CUDA, 1 8 64 on CPU (its convs are slow)
    executors: tuple = ("naive", "topo", "postorder", "agenda", "level")  # naive and the schedules at the top
    channels: int = 128  # REFERENCE.md PG+EE: the execution engine's modules are 128 wide
    size: int = 14  # REFERENCE.md: ResNet-101 conv4 features are 14 x 14
    repeats: int = 5  # timed runs per figure (the best is reported), after one warm-up run
    budget_s: float = 20.0  # stop repeating a figure once its runs have taken this long
    num_images: int = 200  # built-in mini-CLEVR images whose questions (10 each) make the program pool
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    steady_allocator: bool = True  # on CPU, fix glibc's malloc thresholds (see _steady_cpu_allocator)
    json: str = ""  # also write the figures to this JSON file


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


def clevr_programs(num_images, seed=0):
    """Prefix programs of the built-in mini-CLEVR generator's questions (10 per image)."""
    _, questions = data.generate_split(np.random.default_rng(seed), "train", num_images, 10, 64)
    return [data.list_to_prefix(q["program"]) for q in questions]


EXECUTORS = {  # name -> (schedule of its plan, or None for no plan; run function)
    "naive": (None, lambda plan, programs, bank, feats: run_naive(programs, bank, feats)),
    "topo": ("height", lambda plan, programs, bank, feats: run_topo(plan, bank, feats)),
    "postorder": ("postorder", lambda plan, programs, bank, feats: run_topo(plan, bank, feats)),
    "agenda": ("agenda", lambda plan, programs, bank, feats: run_topo(plan, bank, feats)),
    "level": ("height", lambda plan, programs, bank, feats: run_level(plan, bank, feats)),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn, device, repeats, budget_s):
    """Best wall time of fn in ms, device work included, after one warm-up run. The best of a few
    runs, not the median: what the code costs, less what other processes on the machine took."""
    fn()
    times = []
    while len(times) < max(repeats, 1) and sum(times) < budget_s:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


class _CallClock:
    """Forward hooks on the bank's modules: number of module calls and the time inside them."""

    def __init__(self, bank, device):
        self.calls, self.seconds, self.device, self.handles = 0, 0.0, device, []
        for module in bank.values():
            self.handles.append(module.register_forward_pre_hook(self.before))
            self.handles.append(module.register_forward_hook(self.after))

    def before(self, module, args):
        _sync(self.device)
        self.start = time.perf_counter()

    def after(self, module, args, out):
        _sync(self.device)
        self.calls += 1
        self.seconds += time.perf_counter() - self.start

    def remove(self):
        for handle in self.handles:
            handle.remove()


def held_after(fn):
    """MB of the tensors made by fn that are still alive when it returns (its output included): after
    a forward pass, what autograd keeps for backward. Any device; tracked with a dispatch mode."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    made = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    made[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            return out
    with Track():
        out = fn()
    held = sum(n for ref, n in made.values() if not ref.expired())
    del out
    return held / 2 ** 20


def measure(name, programs, bank, feats, probe, cfg, device):
    """One executor on one batch: calls, plan / forward / forward+backward / cell times, memory."""
    schedule, run = EXECUTORS[name]
    params = list(bank.parameters()) + [feats]
    row = {"executor": name, "batch": len(programs)}
    plan = None
    if schedule:
        def planned():
            parse.cache_clear()  # the plan's cost includes reading the programs
            return make_plan(programs, bank, schedule, device)
        row["plan_ms"] = _timed(planned, device, cfg.repeats, cfg.budget_s)
        plan = planned()
        row["levels"] = plan.depth

    def forward():
        return run(plan, programs, bank, feats)  # (B, C, H, W)

    def step():
        for p in params:
            p.grad = None
        (forward() * probe).sum().backward()
    clock = _CallClock(bank, device)
    with torch.no_grad():
        out = forward()
    row["calls"] = clock.calls
    cells = []
    for _ in range(min(cfg.repeats, 3)):
        clock.seconds = 0.0
        forward()
        cells.append(1e3 * clock.seconds)
    row["cell_ms"] = min(cells)  # time inside the module calls alone, best of up to 3 forward passes
    clock.remove()
    row["fwd_ms"] = _timed(forward, device, cfg.repeats, cfg.budget_s)
    row["step_ms"] = _timed(step, device, cfg.repeats, cfg.budget_s)
    row["held_mb"] = held_after(forward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return row, out


def _steady_cpu_allocator():
    """glibc hands big freed blocks back to the OS and page-faults them in again on the next
    allocation, at a cost that depends on what ran before (measured here: topo's forward at batch 64
    took 850 ms after the naive executor, 620 ms before it). Fixed thresholds make each executor pay
    for its own work only, as CUDA's caching allocator does. Linux with glibc only; else nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap for reuse


def _device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def bench(cfg, log=print):
    """Run the benchmark, print the table and return the figures as a dict (also written to cfg.json)."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    sizes = cfg.batch_sizes or ((1, 8, 64, 256, 512, 1024) if device.type == "cuda" else (1, 8, 64))
    for name in cfg.executors:
        if name not in EXECUTORS:
            raise SystemExit(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    if device.type == "cpu" and cfg.steady_allocator:
        _steady_cpu_allocator()
    pool = clevr_programs(cfg.num_images, cfg.seed)
    heights = [parse(tuple(p))[0][2] for p in pool]
    torch.manual_seed(cfg.seed)
    bank = make_bank([t for p in pool for t in p], cfg.channels).to(device)
    info = {"device": _device_name(device), "torch": torch.__version__, "config": dataclasses.asdict(cfg),
            "programs": {"pool": len(pool), "mean_length": float(np.mean([len(p) for p in pool])),
                         "mean_height": float(np.mean(heights)), "max_height": max(heights),
                         "modules": len(bank)}, "rows": [], "ratios": []}
    log(f"device: {info['device']}, torch {torch.__version__}")
    log(f"programs: {len(pool)} from the built-in generator, mean length {info['programs']['mean_length']:.1f}, "
        f"mean height {info['programs']['mean_height']:.1f} (max {max(heights)}), {len(bank)} modules of "
        f"{cfg.channels} x {cfg.size} x {cfg.size}")
    log(f"{'batch':>5} {'executor':<10} {'calls':>6} {'levels':>6} {'plan ms':>8} {'fwd ms':>9} {'fwd+bwd ms':>10} "
        f"{'cell ms':>9} {'held MB':>8} {'peak MB':>8} {'max|diff|':>9}")
    rng = np.random.default_rng(cfg.seed)
    for B in sizes:
        programs = [pool[i] for i in rng.integers(0, len(pool), B)]
        feats = torch.randn(B, cfg.channels, cfg.size, cfg.size, device=device, requires_grad=True)  # (B, C, H, W)
        probe = torch.randn(B, cfg.channels, cfg.size, cfg.size, device=device)  # d loss / d roots
        rows, reference = {}, None
        for name in cfg.executors:
            row, out = measure(name, programs, bank, feats, probe, cfg, device)
            reference = out if reference is None else reference
            row["max_abs_diff"] = (out - reference).abs().max().item()  # against the first executor
            rows[name] = row
            info["rows"].append(row)
            log(f"{B:>5} {name:<10} {row['calls']:>6} {row.get('levels', ''):>6} "
                f"{row.get('plan_ms', float('nan')):>8.2f} "
                f"{row['fwd_ms']:>9.2f} {row['step_ms']:>10.2f} {row['cell_ms']:>9.2f} {row['held_mb']:>8.1f} "
                f"{row.get('peak_mb', float('nan')):>8.1f} {row['max_abs_diff']:>9.1e}")
        if "naive" in rows:
            base = rows["naive"]
            for name, row in rows.items():
                if name == "naive":
                    continue
                ratio = {"batch": B, "executor": name, "calls": base["calls"] / row["calls"],
                         "fwd": base["fwd_ms"] / row["fwd_ms"],
                         "fwd_with_plan": base["fwd_ms"] / (row["fwd_ms"] + row["plan_ms"]),
                         "step": base["step_ms"] / row["step_ms"], "cell": base["cell_ms"] / row["cell_ms"],
                         "memory": row["held_mb"] / base["held_mb"]}
                if "peak_mb" in row:
                    ratio["peak_memory"] = row["peak_mb"] / base["peak_mb"]
                info["ratios"].append(ratio)
                log(f"{'':>5} naive/{name}: calls {ratio['calls']:.1f}x, forward {ratio['fwd']:.2f}x "
                    f"({ratio['fwd_with_plan']:.2f}x with the plan), forward+backward {ratio['step']:.2f}x, "
                    f"cell {ratio['cell']:.2f}x; memory held {name}/naive {ratio['memory']:.2f}"
                    + (f", peak {ratio['peak_memory']:.2f}" if "peak_memory" in ratio else ""))
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(info, f, indent=1)
        log(f"wrote {cfg.json}")
    return info


# ------------------------------------------------------------------------------------------------
# Smoke run and command line
# ------------------------------------------------------------------------------------------------

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
    for name, (schedule, run) in EXECUTORS.items():
        plan = make_plan(programs, bank, schedule, feats.device) if schedule else None
        clock = _CallClock(bank, feats.device)
        out = run(plan, programs, bank, feats)
        clock.remove()
        grads = torch.autograd.grad((out * probe).sum(), inputs)
        diff = max((a - b).abs().max().item() for a, b in zip([out, *grads], [ref, *ref_grads]))
        log(f"{name:<10} module calls {clock.calls:>4}, max |difference from naive| (roots and gradients) {diff:.1e}")
        assert diff < 1e-9, name


def _field_help(cls):
    """The comment after each field of a config dataclass, as its --help text."""
    import inspect
    lines = inspect.getsource(cls).splitlines()
    return {line.split(":")[0].strip(): line.split("#", 1)[1].strip() for line in lines if "#" in line and ":" in line}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("smoke", help="tiny run: every executor agrees with the naive one (the default command)")
    b = sub.add_parser("bench", help="naive vs topological execution of an IEP-sized module bank",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(BenchConfig)
    for f in dataclasses.fields(BenchConfig):
        flag, kind, text = "--" + f.name.replace("_", "-"), type(f.default), helps.get(f.name, "")
        if kind is tuple:
            b.add_argument(flag, nargs="+", type=int if f.name == "batch_sizes" else str, default=f.default, help=text)
        elif kind is bool:
            b.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            b.add_argument(flag, type=kind, default=f.default, help=text)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(BenchConfig(**{f.name: tuple(v) if isinstance(v, list) else v
                                    for f in dataclasses.fields(BenchConfig) for v in [getattr(args, f.name)]}))
    smoke()


if __name__ == "__main__":
    main()
