"""Tests for stack_nmn.py: the stack's invariants, sharpening, the modules, the expert layout, the weight
decay as a regularizer, shapes and gradients, overfitting a batch, the step protocol under DACT, and the
command line (CPU, seconds). The figure
(`python analyze.py stack-figure`) is tested in test_analyze.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import dact
import data
import stack_nmn as sn
import train

TOKENS = ["<NULL>", "<START>", "<END>", "<UNK>", "count", "exist", "scene", "filter_color[red]", "relate[left]",
          "unique", "intersect", "equal_integer", "query_shape", "equal_shape"]
INFO = dict(num_words=30, num_answers=8, image_kind="features", image_shape=(18, 6, 6), program_tokens=TOKENS)
TINY = dict(dim=16, embed_dim=8, kb_dim=8, pe_dim=4, mem_dim=8, out_dim=16, output_dropout=0.0)
TINY_FLAGS = ["--dim", "16", "--embed-dim", "8", "--kb-dim", "8", "--pe-dim", "4", "--mem-dim", "8", "--out-dim", "16",
              "--batch-size", "16", "--threads", "1", "--log-every", "1"]


def tok(*names):
    return [TOKENS.index(n) for n in names]


def make_batch(B=6, S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([S - i % 3 for i in range(B)])
    q = torch.randint(4, 30, (B, S), generator=g) * (torch.arange(S) < lens[:, None])
    progs = [tok("<START>", "count", "filter_color[red]", "scene", "<END>"),
             tok("<START>", "exist", "relate[left]", "unique", "filter_color[red]", "scene", "<END>")]
    program = torch.tensor([p + [0] * (7 - len(p)) for p in progs] * (B // 2))
    return dict(image=torch.rand(B, 18, 6, 6, generator=g), question=q, question_len=lens, program=program,
                answer=torch.randint(0, 8, (B,), generator=g))


def model(**kw):
    torch.manual_seed(0)
    return sn.StackNMN(sn.StackNMNConfig(**{**TINY, **kw}), INFO)


def test_config_defaults_and_presets():
    d = sn.StackNMNConfig()
    assert (d.max_steps, d.stack_len, d.sharpen, d.sharpen_temp) == (9, 8, "hard", 0.2)
    fields = {f.name for cls in (sn.StackNMNConfig, train.TrainConfig, train.Recipe) for f in dataclasses.fields(cls)}
    assert set(sn.PRESETS["laptop"]) <= fields
    assert len(sn.MODULES) == 9


def test_initialised_as_the_official_tensorflow_code():
    m = sn.StackNMN(sn.StackNMNConfig(dim=64, embed_dim=64, kb_dim=256, pe_dim=16, mem_dim=64, out_dim=64), INFO)
    for name, layer in m.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_out, fan_in = layer.weight.shape[:2]
            assert layer.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5, name  # Xavier-uniform's bound
            assert layer.bias is None or not layer.bias.any(), name
    w = m.modules_.find_conv.weight  # (1, 256): its norm bounds the Find map's logits (l2norm before it)
    assert 1.2 < w.norm() < 1.7  # Xavier: about sqrt(2); PyTorch's default would give about 0.58


def test_pointer_stays_a_distribution_and_clamps_at_both_ends():
    p = torch.rand(5, 8).softmax(-1)
    for f in (sn.push, sn.pop):
        q = p
        for _ in range(10):                                    # far past either end
            q = f(q)
            assert torch.allclose(q.sum(-1), torch.ones(5)) and (q >= 0).all()
    top, bottom = F.one_hot(torch.tensor([7]), 8).float(), F.one_hot(torch.tensor([0]), 8).float()
    assert torch.equal(sn.push(top), top) and torch.equal(sn.pop(bottom), bottom)
    assert torch.equal(sn.sharpen(p, "hard", 0.2).argmax(-1), p.argmax(-1))


def test_sharpening_hard_is_the_argmax_and_soft_approaches_it_as_the_temperature_falls():
    g = torch.Generator().manual_seed(0)
    peak = torch.tensor([3, 0, 7, 5, 3])
    p = 0.5 * torch.rand(5, 8, generator=g)
    p[torch.arange(5), peak] += 1.0                            # a clear top slot in every row
    p = p / p.sum(-1, keepdim=True)                            # an averaged pointer: spread over the slots
    hard = torch.zeros(5, 8)
    hard[torch.arange(5), peak] = 1.0
    assert torch.equal(sn.sharpen(p, "hard", 0.2), hard)       # the one-hot of the top slot, whatever temp
    gaps = [(sn.sharpen(p, "soft", temp) - hard).abs().sum(-1) for temp in (1.0, 0.2, 0.05, 0.01, 1e-3)]
    for hotter, colder in zip(gaps, gaps[1:]):
        assert (colder < hotter).all()                         # colder is closer to one-hot, row by row
    assert gaps[0].min() > 1.0 and gaps[-1].max() < 1e-3       # far from it at temp 1, on it at 1e-3


def test_push_then_pop_returns_the_pushed_map():
    A, p = torch.randn(2, 36, 8), F.one_hot(torch.tensor([2, 5]), 8).float()
    x = torch.randn(2, 36)
    p1 = sn.push(p)
    A1 = sn.write(A, p1, x)
    assert torch.allclose(sn.read(A1, p1), x)                 # the top is the pushed map
    assert torch.equal(sn.pop(p1), p) and torch.allclose(sn.read(A1, p), sn.read(A, p))  # below: unchanged


def run_modules(m, A, p):
    kb, mem, c = torch.randn(2, 36, 8), torch.randn(2, 8), torch.randn(2, 8)
    return kb, c, m.modules_(kb, A, p, mem, c), mem


def test_and_or_are_min_max_and_describe_leaves_the_stack():
    m = model()
    A, p = torch.randn(2, 36, 8), F.one_hot(torch.tensor([3, 1]), 8).float()
    _, _, (As, ps, ms), mem = run_modules(m, A, p)
    below, top = sn.read(A, sn.pop(p)), sn.read(A, p)
    for idx, fn in ((sn.AND, torch.minimum), (sn.OR, torch.maximum)):
        assert torch.equal(ps[..., idx], sn.pop(p))
        assert torch.allclose(sn.read(As[..., idx], ps[..., idx]), fn(below, top))
    for idx in (sn.ANSWER, sn.COMPARE, sn.NOOP):
        assert torch.equal(As[..., idx], A) and torch.equal(ps[..., idx], p)
    assert torch.equal(ms[..., sn.NOOP], mem) and (ms[..., sn.FIND] == 0).all()


def test_filter_reuses_find_and_then_ands():
    m = model()
    assert not [n for n, _ in m.named_parameters() if "filter" in n]  # no weights of its own
    A, p = torch.randn(2, 36, 8), F.one_hot(torch.tensor([3, 1]), 8).float()
    kb, c, (As, ps, _), _ = run_modules(m, A, p)
    A_find, p_find = As[..., sn.FIND], ps[..., sn.FIND]
    assert torch.equal(p_find, sn.push(p)) and torch.equal(ps[..., sn.FILTER], p)
    assert torch.allclose(sn.read(As[..., sn.FILTER], p), torch.minimum(sn.read(A, p), sn.read(A_find, p_find)))


def test_expert_layout_follows_the_official_conversion():
    L = lambda *t: [sn.MODULES[i] for i in sn.expert_layout(t, prune_filters=False)]
    assert L("count", "filter_color[red]", "scene") == ["Find", "Answer"]
    assert L("count", "scene") == ["Scene", "Answer"]
    assert L("exist", "relate[left]", "unique", "filter_color[red]", "scene") == ["Find", "Transform", "Answer"]
    assert L("equal_integer", "count", "filter_color[red]", "scene", "count", "scene") == ["Find", "Scene", "Compare"]
    assert L("equal_shape", "query_shape", "unique", "filter_color[red]", "scene", "query_shape", "unique",
             "filter_color[red]", "filter_color[red]", "scene") == ["Find", "Find", "Filter", "Compare"]
    assert L("count", "intersect", "filter_color[red]", "scene", "scene") == ["Find", "Scene", "And", "Answer"]
    gt = model(layout="gt").layouts(make_batch()["program"])
    assert gt.shape == (6, 9) and gt[0].tolist() == [sn.FIND, sn.ANSWER] + [sn.NOOP] * 7


def filtered(*attrs):
    """Prefix tokens of filter_<attr>[v] for each attribute, outermost first (as CLEVR writes a noun phrase)."""
    value = {"size": "large", "color": "red", "material": "metal", "shape": "cube"}
    return [f"filter_{a}[{value[a]}]" for a in attrs]


ALL = ("shape", "material", "color", "size")
HOP = lambda rel: [*filtered(*ALL), f"relate[{rel}]", "unique"]  # "the <noun> that is <rel> the ..."
OBJECT = [*filtered(*ALL), "scene"]
LONG_TEMPLATES = {  # CLEVR's longest kinds, every attribute given (the official generator's worst case)
    "three_hop": ["query_color", "unique", *HOP("left"), *HOP("behind"), *HOP("front"), *OBJECT],
    "same_relate": ["count", *filtered(*ALL), "same_size", "unique", *OBJECT],
    "comparison, two hops": ["greater_than", "count", *HOP("left")[:-1], "unique", *OBJECT,
                             "count", *HOP("right")[:-1], "unique", *OBJECT],
    "compare attribute, two hops": ["equal_color", "query_color", "unique", *HOP("left"), *OBJECT,
                                    "query_color", "unique", *HOP("behind"), *OBJECT],
}


@pytest.mark.parametrize("name", LONG_TEMPLATES)
def test_pruned_expert_layouts_of_clevrs_long_templates_fit_T(name):
    tokens = LONG_TEMPLATES[name]
    assert data.prefix_to_list(tokens)  # a well-formed CLEVR program
    full, pruned = sn.expert_layout(tokens, prune_filters=False), sn.expert_layout(tokens)
    assert len(pruned) <= sn.StackNMNConfig().max_steps < len(full)  # only the pruned layout fits T = 9
    assert sn.FILTER in full and all(not (a in (sn.FIND, sn.FILTER) and b == sn.FILTER)
                                     for a, b in zip(pruned, pruned[1:]))
    kept = [m for m in full if m != sn.FILTER]  # only Filters go; every other module stays, in order
    assert [m for m in pruned if m != sn.FILTER] == kept


def test_pruning_judges_each_filter_by_its_unpruned_predecessor():
    # Find, Filter, Filter: the official loop runs backwards over the unpruned list, so both Filters go
    tokens = ("count", *filtered("shape", "material", "color"), "scene")
    assert sn.expert_layout(tokens, prune_filters=False) == [sn.FIND, sn.FILTER, sn.FILTER, sn.ANSWER]
    assert sn.expert_layout(tokens) == [sn.FIND, sn.ANSWER]
    after_transform = ("count", *filtered("shape", "color"), "relate[left]", "unique", *filtered("color"), "scene")
    assert sn.expert_layout(after_transform) == [sn.FIND, sn.TRANSFORM, sn.FILTER, sn.ANSWER]


@pytest.mark.parametrize("kw", [dict(layout="gt"), dict(layout="scratch", sharpen="soft")])
def test_shapes_and_finite_gradients(kw):
    m = model(**kw).train()
    m.progress = 0.9                                           # the entropy term is on
    out = m(make_batch())
    assert out["log_probs"].shape == (6, 8)
    assert torch.allclose(out["log_probs"].exp().sum(-1), torch.ones(6), atol=1e-5)
    loss = F.nll_loss(out["log_probs"], make_batch()["answer"]) + out["aux_loss"]
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if kw["layout"] == "gt":
        assert out["metrics"]["layout_acc"].shape == (6,)


def test_weight_decay_is_the_regularizer_and_not_in_aux_loss():
    """wd / 2 * sum ||W||^2 over the weight matrices of every fc and conv layer (not the embeddings, the LSTM
    or c_0), returned by regularizer() for the trainer's training loss; forward's aux_loss leaves it out."""
    b = make_batch()
    for layout in ("gt", "scratch"):
        m = model(layout=layout, weight_decay=0.5).train()
        layers = [x for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))]
        want = 0.5 / 2 * sum((x.weight ** 2).sum() for x in layers)
        assert torch.allclose(m.regularizer(), want) and m.regularizer() > 0
        no_wd = model(layout=layout, weight_decay=0.0).train()  # the same weights (seed 0)
        m.progress = no_wd.progress = 0.5                      # before the entropy ramp
        aux = m(b)["aux_loss"]
        assert torch.equal(torch.as_tensor(aux), torch.as_tensor(no_wd(b)["aux_loss"]))
        if layout == "scratch":
            assert aux == 0                                    # nothing but the (still off) entropy term
    assert model(weight_decay=0.0).regularizer() == 0


def test_entropy_term_is_ramped_in_late():
    m = model(weight_decay=0.0).train()
    b = make_batch()
    m.progress = 0.5
    assert m(b)["aux_loss"] == 0
    m.progress = 0.9
    assert m(b)["aux_loss"] > 0


def test_overfits_one_batch():
    m = model(layout="gt", dim=32).train()
    b = make_batch(B=8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = m(b)
        loss = F.nll_loss(out["log_probs"], b["answer"])
        opt.zero_grad()
        (loss + out["aux_loss"]).backward()
        opt.step()
        first = first or loss.item()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_forward_is_the_step_protocol_and_dact_wraps_it():
    m = model().eval()
    b = make_batch()
    ctx, states = m.run(b)
    assert len(states) == 9 and states[-1]["stack"].shape == (6, 36, 8)
    assert torch.allclose(m(b)["log_probs"], m.classify(ctx, states[-1]).log_softmax(-1))
    for s in states:
        assert torch.allclose(s["ptr"].sum(-1), torch.ones(6))
    wrapped = dact.DACT(m, dact.DACTConfig())
    for mode in (True, False):
        out = wrapped.train(mode)(b)
        assert out["log_probs"].shape == (6, 8) and torch.isfinite(out["log_probs"]).all()


def test_cli_gt_layout_and_dact(tiny_data, tmp_path, capsys, monkeypatch):
    calls, real = [], sn.StackNMN.regularizer

    def spy(self):                                             # when the trainer asks for the weight decay
        calls.append(self.training)
        return real(self)
    monkeypatch.setattr(sn.StackNMN, "regularizer", spy)
    rec = train.main(["stack_nmn", "--layout", "gt", "--data", str(tiny_data), "--out", str(tmp_path / "gt"),
                      "--iters", "2", *TINY_FLAGS])
    assert rec["final_acc"] is not None and "layout_acc" in capsys.readouterr().out
    assert calls == [True, True]                               # the trainer adds it to its 2 training losses only
    monkeypatch.undo()
    train.main(["stack_nmn", "dact", "--data", str(tiny_data), "--out", str(tmp_path / "dact"), "--iters", "2",
                "--max-steps", "3", *TINY_FLAGS])
