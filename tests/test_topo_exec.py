"""topo_exec.py: the plan's levels and groups, topological vs per-example execution (roots and
gradients), the module-call bound, and regathering instead of keeping the gathered copies (measured
with bench.py's call clock and memory probe; the benchmark itself is tested in test_bench.py)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import topo_exec as T
from bench import CallClock, held_after

C, S = 4, 6  # tiny modules: channels, map size
UNARY = ["filter_color[red]", "filter_shape[cube]", "filter_size[small]", "relate[left]", "relate[front]",
         "unique", "count", "exist", "query_color", "same_shape"]
BINARY = ["union", "intersect", "equal_color", "equal_integer", "less_than", "greater_than"]


def random_program(rng, depth):
    """A random prefix program with CLEVR's tokens, many binary nodes and uneven branches."""
    if depth == 0 or rng.random() < 0.15:
        return ["scene"]
    if rng.random() < 0.35:
        return [BINARY[rng.integers(len(BINARY))]] + random_program(rng, depth - 1) + random_program(rng, depth - 1)
    return [UNARY[rng.integers(len(UNARY))]] + random_program(rng, depth - 1)


@pytest.fixture(scope="module")
def clevr():
    return T.clevr_programs(16, seed=1)  # 160 programs from the built-in generator


def tiny_bank(programs, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return T.make_bank(UNARY + BINARY + [t for p in programs for t in p], C).to(dtype)


def roots_and_grads(run, bank, feats, probe):
    out = run()
    inputs = [feats] + list(bank.parameters())
    grads = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)
    return [out] + [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def count_calls(bank, run):
    clock = CallClock(bank, torch.device("cpu"))
    with torch.no_grad():
        run()
    clock.remove()
    return clock.calls


def test_parse_agrees_with_data_helpers(clevr):
    for tokens in clevr:
        nodes = T.parse(tuple(tokens))
        assert [n[0] for n in nodes] == tokens
        assert [n[2] for n in nodes] == data.node_heights(tokens)
        post = sorted(range(len(nodes)), key=lambda k: nodes[k][3])  # post-order = the CLEVR node list
        assert [nodes[k][0] for k in post] == [data.node_token(n) for n in data.prefix_to_list(tokens)]
        tree = data.prefix_to_tree(tokens)

        def check(k, subtree):
            assert nodes[k][0] == subtree["token"] and len(nodes[k][1]) == len(subtree["children"])
            for c, child in zip(nodes[k][1], subtree["children"]):
                check(c, child)
        check(0, tree)


def test_malformed_programs_read_as_clevr_iep():
    nodes = T.parse(("<START>", "equal_color", "query_color", "<END>", "<NULL>"))
    assert [n[0] for n in nodes] == ["equal_color", "query_color", "scene", "scene"]  # missing -> scene
    assert [n[0] for n in T.parse(("count", "scene", "scene", "exist"))] == ["count", "scene"]  # extra ignored
    programs = [["<START>", "equal_color", "query_color", "<END>"], ["union"], ["count", "scene", "exist"]]
    bank = tiny_bank(programs)
    feats = torch.randn(3, C, S, S, dtype=torch.float64)
    ref = T.run_naive(programs, bank, feats)
    assert torch.allclose(T.run_topo(T.make_plan(programs, bank), bank, feats), ref, atol=1e-10)
    with pytest.raises(KeyError, match="no module"):
        T.make_plan([["frobnicate"]], bank)


@pytest.mark.parametrize("schedule", ["height", "postorder"])
def test_plan_levels_and_groups(clevr, schedule):
    rng = np.random.default_rng(0)
    programs = clevr[:40] + [random_program(rng, 7) for _ in range(24)]
    bank = tiny_bank(programs)
    plan = T.make_plan(programs, bank, schedule)
    nodes = [(n[2] if schedule == "height" else n[3], n[0]) for p in programs for n in T.parse(tuple(p))]
    assert plan.num_nodes == len(nodes)
    if schedule == "height":
        assert plan.depth == max(data.node_heights(p)[0] for p in programs) + 1
    else:
        assert plan.depth == max(len(p) for p in programs)  # the official schedule: steps = program length
    for h, level in enumerate(plan.levels):
        keys = [key for key, _ in level.groups]
        assert len(keys) == len(set(keys)), "one call per module and level"
        assert sorted(keys) == sorted({t for lv, t in nodes if lv == h})
        assert sum(level.sizes) == sum(lv == h for lv, _ in nodes)
        for (key, slots), n in zip(level.groups, level.sizes):
            assert len(slots) == T.num_inputs(key) and all(level.arg_sizes[a] == n for a in slots)
    assert plan.calls == len(set(nodes))  # one call per distinct (level, module)


@pytest.mark.parametrize("executor", ["topo", "postorder", "agenda", "level"])
@pytest.mark.parametrize("source", ["clevr", "random", "mixed"])
def test_topo_equals_naive(clevr, executor, source):
    rng = np.random.default_rng(3)
    randoms = [random_program(rng, int(rng.integers(1, 8))) for _ in range(24)]
    programs = {"clevr": clevr[:24], "random": randoms, "mixed": clevr[100:112] + randoms[:12]}[source]
    assert any(data.arity(t) == 2 for p in programs for t in p)
    bank = tiny_bank(programs)
    feats = torch.randn(len(programs), C, S, S, dtype=torch.float64, requires_grad=True)
    probe = torch.randn_like(feats)
    schedule, run = T.EXECUTORS[executor]
    plan = T.make_plan(programs, bank, schedule)
    got = roots_and_grads(lambda: run(plan, programs, bank, feats), bank, feats, probe)
    ref = roots_and_grads(lambda: T.run_naive(programs, bank, feats), bank, feats, probe)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_float32_and_function_keyed_bank(clevr):
    """A bank with one module per function (not per token) and float32: equal within float32 noise.
    Batched and per-example convolutions sum in different orders (and oneDNN may pick another algorithm
    for another batch size): gradients up to about 20 differed by more than 1e-5 + 1e-5 |x| once in a
    full-suite run on a busy machine, so the relative tolerance is 1e-4."""
    programs = clevr[:32]
    torch.manual_seed(0)
    bank = nn.ModuleDict({fn: T.ConcatBlock(C) if data.arity(fn) == 2 else T.ResBlock(C)
                          for fn in {data.token_function(t) for p in programs for t in p}})
    feats = torch.randn(len(programs), C, S, S, requires_grad=True)
    probe = torch.randn_like(feats)
    plan = T.make_plan(programs, bank)
    got = roots_and_grads(lambda: T.run_topo(plan, bank, feats), bank, feats, probe)
    ref = roots_and_grads(lambda: T.run_naive(programs, bank, feats), bank, feats, probe)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_module_call_bound(clevr):
    programs = clevr[:64]
    bank = tiny_bank(programs, torch.float32)
    feats = torch.randn(64, C, S, S)
    plan = T.make_plan(programs, bank)
    naive = count_calls(bank, lambda: T.run_naive(programs, bank, feats))
    topo = count_calls(bank, lambda: T.run_topo(plan, bank, feats))
    level = count_calls(bank, lambda: T.run_level(plan, bank, feats))
    modules = len({t for p in programs for t in p})
    max_height = max(data.node_heights(p)[0] for p in programs)
    assert naive == plan.num_nodes and topo == plan.calls and level == plan.level_calls
    assert topo <= (max_height + 1) * modules  # the O(p d) bound
    assert level <= 2 * (max_height + 1)  # one call per level and architecture (unary, binary)
    assert naive >= 10 * level
    # one call per (level, module) needs larger batches for 10x: 40 modules spread over ~12 levels
    assert naive > 2.5 * topo
    big = T.clevr_programs(60, seed=2)[:512]
    big_plan = T.make_plan(big, T.make_bank([t for p in big for t in p], 1))
    assert big_plan.num_nodes >= 10 * big_plan.calls


def test_agenda_schedule(clevr):
    """One module per level, every node after its children, fewer calls than (height, module), and
    never fewer than the lower bound: per module, the most nodes of it on one root-to-leaf path."""
    programs = clevr[:64]
    bank = tiny_bank(programs)
    keys, kids = [], []
    for p in programs:
        base = len(keys)
        for token, children, _, _ in T.parse(tuple(p)):
            keys.append(token), kids.append([base + c for c in children])
    level_of = T.agenda_levels(keys, kids)
    assert all(level_of[c] < level_of[k] for k in range(len(keys)) for c in kids[k])
    assert len({(level_of[k], keys[k]) for k in range(len(keys))}) == max(level_of) + 1  # one module a level

    def most_on_a_path(k, key):  # nodes of `key` on the longest such chain from node k down
        return (keys[k] == key) + max((most_on_a_path(c, key) for c in kids[k]), default=0)
    roots = sorted(set(range(len(keys))) - {c for ks in kids for c in ks})
    bound = sum(max(most_on_a_path(r, key) for r in roots) for key in set(keys))
    plan, height = T.make_plan(programs, bank, "agenda"), T.make_plan(programs, bank)
    assert all(len(level.groups) == 1 for level in plan.levels) and plan.calls == max(level_of) + 1
    assert bound <= plan.calls < 0.6 * height.calls  # RESULTS.md's batch of 64 (its agenda, topo and floor)


def test_regather_keeps_memory_of_per_example_execution(clevr):
    programs = clevr[:32]
    bank = tiny_bank(programs, torch.float32)
    feats = torch.randn(32, C, S, S, requires_grad=True)
    plan = T.make_plan(programs, bank)
    naive = held_after(lambda: T.run_naive(programs, bank, feats))
    assert held_after(lambda: T.run_topo(plan, bank, feats)) <= 1.01 * naive
    assert held_after(lambda: T.run_topo(plan, bank, feats, regather=False)) > 1.2 * naive  # the copies
    assert held_after(lambda: T.run_level(plan, bank, feats)) <= 1.05 * naive
    probe = torch.randn(32, C, S, S)
    kept = roots_and_grads(lambda: T.run_topo(plan, bank, feats, regather=False), bank, feats, probe)
    regathered = roots_and_grads(lambda: T.run_topo(plan, bank, feats), bank, feats, probe)
    for a, b in zip(kept, regathered):
        assert torch.equal(a, b)


def test_in_place_module_is_refused():
    class InPlace(nn.Module):
        def forward(self, x):
            return x.mul_(2)
    bank = nn.ModuleDict({"scene": nn.Conv2d(C, C, 1), "count": InPlace()})
    programs = [["count", "scene"]] * 3
    feats = torch.randn(3, C, S, S, requires_grad=True)
    with pytest.raises(RuntimeError, match="in ?place"):
        T.run_topo(T.make_plan(programs, bank), bank, feats)
