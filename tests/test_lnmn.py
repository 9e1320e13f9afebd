"""Tests for lnmn.py: one-hot nodes, the fast node against the paper's, the fast cells against the cells
node by node (values and gradients), the expression printer, inventories, the stack rule's and the merge
norm's flags (the stack rule on a hand-made layout), no weight decay, the entropy term's scales and the
lambda_w curves, the init flags' distributions, gradients, the alpha step (weights frozen), overfitting,
the trainer's alpha step, and the experiments beyond the paper (CPU, seconds). The analysis
(`python analyze.py lnmn`) is tested in test_analyze.py."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lnmn
import stack_nmn as sn
import train

INFO = dict(num_words=30, num_answers=8, image_kind="features", image_shape=(18, 6, 6))
TINY = dict(map_dim=8, dim=16, embed_dim=8, kb_dim=8, pe_dim=4, mem_dim=8, out_dim=16, output_dropout=0.0)
TINY_FLAGS = ["--map-dim", "8", "--dim", "16", "--embed-dim", "8", "--kb-dim", "8", "--pe-dim", "4", "--mem-dim", "8",
              "--out-dim", "16", "--batch-size", "16", "--threads", "1", "--log-every", "1"]


def make_batch(B=6, S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([S - i % 3 for i in range(B)])
    q = torch.randint(4, 30, (B, S), generator=g) * (torch.arange(S) < lens[:, None])
    return dict(image=torch.rand(B, 18, 6, 6, generator=g), question=q, question_len=lens,
                answer=torch.randint(0, 8, (B,), generator=g))


def model(**kw):
    torch.manual_seed(0)
    return lnmn.LNMN(lnmn.LNMNConfig(**{**TINY, **kw}), INFO)


def one_hot_alpha(*ops):
    return torch.stack([F.one_hot(torch.tensor(lnmn.OPS.index(o)), 6).float() * 20 for o in ops])


@pytest.mark.parametrize("op", range(6))
def test_a_node_with_one_hot_alpha_is_that_op(op):
    x1, x2 = torch.randn(2, 36, 5), torch.randn(2, 36, 1)      # an attention map broadcasts over channels
    want = (torch.minimum(x1, x2), torch.maximum(x1, x2), x1 + x2, x1 * x2, x1, x2.expand_as(x1))[op]
    w = F.one_hot(torch.tensor(op), 6).float()
    assert torch.allclose(lnmn.node(w, x1, x2), F.normalize(want, dim=-1), atol=1e-6)
    alpha = torch.zeros(6).index_fill_(0, torch.tensor([op]), 1.0)
    assert torch.equal(lnmn.op_weights(alpha, hard=True), w)


def test_node_values_and_gradients_are_the_sum_over_the_six_ops_ties_included():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 36, 5, generator=g)
    x2 = torch.randn(3, 36, 1, generator=g)
    x2[:, :4] = x1[:, :4, :1]                                    # ties: min/max split the gradient in half
    w = torch.rand(6, generator=g).softmax(0)
    a1, a2, b1, b2 = (t.clone().requires_grad_() for t in (x1, x2, x1, x2))
    ops = (torch.minimum(a1, a2), torch.maximum(a1, a2), a1 + a2, a1 * a2, a1, a2.expand_as(a1))
    want = F.normalize(sum(wi * o for wi, o in zip(w, ops)), dim=-1)
    got = lnmn.node(w, b1, b2)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(lnmn.node_reference(w, x1, x2), want, atol=1e-6)  # the paper's form is that sum
    up = torch.randn(want.shape, generator=g)
    (want * up).sum().backward()
    (got * up).sum().backward()
    assert torch.allclose(b1.grad, a1.grad, atol=1e-5) and torch.allclose(b2.grad, a2.grad, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shapes", [((3, 36, 5), (3, 36, 1)),   # O1(conv1(I), a): a map over the channels
                                    ((3, 36, 1), (3, 36, 1)),   # O1(a1, a2): two maps
                                    ((3, 36, 5), (3, 1, 5))])   # O(x, W1 c): c over the positions
def test_node_is_the_papers_node_values_and_gradients(shapes, normalize):
    """`node` (rearranged for speed) against `node_reference` (Sec. 3.1 as written): values and the
    gradients of x1, x2 and alpha, with ties where min and max split the gradient."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(shapes[0], generator=g), torch.randn(shapes[1], generator=g)
    if shapes[1][1] == 36:
        x1[:, :4, :1] = x2[:, :4]                              # ties
    alpha = torch.randn(6, generator=g)
    leaves = [[t.clone().requires_grad_() for t in (x1, x2, alpha)] for _ in range(2)]
    outs = [f(a.softmax(0), u, v, normalize) for f, (u, v, a) in zip((lnmn.node_reference, lnmn.node), leaves)]
    assert outs[0].shape == outs[1].shape == torch.broadcast_shapes(*shapes)
    assert torch.allclose(outs[1], outs[0], atol=1e-6)
    up = torch.randn(outs[0].shape, generator=g)
    for out in outs:
        (out * up).sum().backward()
    for want, got in zip(*leaves):
        assert torch.allclose(got.grad, want.grad, atol=1e-5)


def loss_and_grads(m, reference, batch):
    m.modules_.reference = reference
    m.zero_grad()
    out = m(batch)
    loss = F.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"] + out["arch_loss"]
    loss.backward()
    return out["log_probs"].detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw,bank", [
    (dict(), {}),                                              # the official node: L2 norm after every node
    (dict(node_norm=False), {}),                               # the laptop preset's node: last node folded
    (dict(node_norm=True, norm_fix=False), {}),                # the official merge norm (sign)
    (dict(node_norm=False, modules=14, push_fix=True), {}),
    (dict(node_norm=False, compare="pooled"), {}),
    (dict(node_norm=False, cells="stack"), {}),
    (dict(node_norm=False), dict(hard=True)),                  # hard-max alphas (Table 2)
    (dict(node_norm=False), dict(op_mask=torch.tensor([1.0, 0, 1, 1, 1, 1])))])  # without max (Table 7)
def test_fast_cells_equal_the_cells_node_by_node(kw, bank):
    """CellModules runs Cell.fast (|conv1(I) - a| shared by the 3-input cells, the last node folded into
    the output layer); Cell.forward computes every node as Sec. 3.1 writes it. Same log-probabilities and
    the same gradient of every parameter, alphas included, over a whole forward (T = 5 steps)."""
    m = model(**kw).train()
    with torch.no_grad():                                      # alphas far from uniform: every op weighs
        for alpha in [a for a in m.arch_parameters() if a.requires_grad]:  # --cells stack keeps its cells
            alpha.normal_()
    for k, v in bank.items():
        setattr(m.modules_, k, v)
    b = make_batch()
    (want, want_grads), (got, got_grads) = (loss_and_grads(m, ref, b) for ref in (True, False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 30
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("kind,inputs", [("attn", 3), ("attn", 4), ("ans", 3), ("ans", 4)])
def test_fast_cell_equals_the_cell_node_by_node_inputs_included(kind, inputs, norm):
    """One cell: Cell.fast against Cell.forward on random inputs, in values and in the gradients of conv1(I),
    the maps, W1 c, f_mem, alpha and the output layer; the 3-input cell with |conv1(I) - a| handed in."""
    torch.manual_seed(2)
    cell = lnmn.Cell(kind, inputs, lnmn.LNMNConfig(**{**TINY, "node_norm": norm}))
    cell.alpha.data.normal_()                                  # far from uniform: every op weighs
    B, K, d = 4, 36, TINY["map_dim"]
    leaves = [torch.randn(B, K, d), *torch.randn(inputs - 2, B, K), torch.randn(B, d), torch.randn(B, TINY["mem_dim"])]
    runs = []
    for fast in (False, True):
        cell.zero_grad()
        I, *maps, c, m = xs = [t.clone().requires_grad_() for t in leaves]
        dist = (I - maps[-1][..., None]).abs() if inputs == 3 else None
        out = cell.fast(I, maps, c, m, dist=dist) if fast else cell(I, maps, c, m)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append([out.detach()] + [t.grad for t in xs] + [p.grad.clone() for p in cell.parameters()])
    for want, got in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_model_runs_the_fast_cells(monkeypatch):
    """Cell.forward (node by node) is the reference; the model's forward does not call it."""
    calls = []
    real = lnmn.Cell.forward
    monkeypatch.setattr(lnmn.Cell, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    m = model()
    m(make_batch())
    assert not calls and m.modules_.reference is False
    m.modules_.reference = True
    m(make_batch())
    assert len(calls) == 5 * len(m.modules_.cells)             # T = 5 steps


def test_no_weight_decay_on_the_weights():
    """Sec. 4: no weight decay. Stack-NMN's regularizer is not inherited: the trainer adds 0, and aux_loss
    is the entropy term alone (0 where lambda_w is 0)."""
    m = model().train()
    assert m.regularizer() == 0 and not hasattr(m.cfg, "weight_decay")
    m.progress = m.cfg.entropy_switch                          # lambda_w = 0
    assert m(make_batch())["aux_loss"] == 0


def test_expression_printer_on_hand_set_alphas():
    cfg = lnmn.LNMNConfig(**TINY)
    cases = [(("attn", 3), ("max", "sum"), "conv2(max(conv1(I), a) + W1 c)"),
             (("attn", 3), ("choose_2", "product"), "conv2(a * W1 c)"),
             (("attn", 4), ("max", "choose_1", "product"), "conv2(max(a1, a2) * W1 c)"),
             (("ans", 3), ("min", "product"), "W2[sum(min(conv1(I), a) * W1 c), W1 c, f_mem]"),
             (("ans", 4), ("min", "sum", "product"), "W2[sum((min(a1, a2) + conv1(I)) * W1 c), W1 c, f_mem]")]
    for (kind, inputs), ops, text in cases:
        cell = lnmn.Cell(kind, inputs, cfg)
        with torch.no_grad():
            cell.alpha.copy_(one_hot_alpha(*ops))
        assert cell.expression() == text


@pytest.mark.parametrize("n,counts", lnmn.INVENTORIES.items())
def test_module_inventories_of_table_3(n, counts):
    m = model(modules=n)
    assert len(m.module_names) == n == 1 + sum(counts)
    kinds = [(c.kind, c.inputs) for c in m.modules_.cells]
    assert [kinds.count(k) for k in [("attn", 3), ("attn", 4), ("ans", 3), ("ans", 4)]] == list(counts)
    assert m.controller.module_logits.out_features == n


def test_stack_rule_and_merge_norm_flags():
    kb, mem, c = torch.randn(2, 36, 8), torch.randn(2, 8), torch.randn(2, 16)  # c_t: BiLSTM size (dim 16)
    A, bottom = torch.randn(2, 36, 5), F.one_hot(torch.tensor([0, 0]), 5).float()
    for fix in (False, True):
        _, ps, _ = model(push_fix=fix).modules_(kb, A, bottom, mem, c)
        moved = [not torch.equal(ps[..., i], bottom) for i in range(ps.size(-1))]
        assert any(moved) == fix                               # official: no module moves the pointer up
    I, c, m = torch.randn(6, 36, 8), torch.randn(6, 8), torch.randn(6, 8)
    a1, a2 = torch.randn(6, 36), torch.randn(6, 36)
    scale = torch.rand(6, 36) + 0.5                            # new magnitudes, the same signs
    for fix in (False, True):
        for cell in model(norm_fix=fix).modules_.cells:
            if cell.inputs == 4:                               # official: the merged map is sign(x)
                cell.alpha.data = F.one_hot(torch.tensor([0, 2, 3]), 6).float()  # min(a1, a2) + conv1(I), * W1 c
                run = lambda *maps: cell(I, list(maps), c, m, hard=True)  # exactly those ops
                same = torch.allclose(run(a1, a2), run(a1 * scale, a2 * scale), atol=1e-5)
                assert same != fix


def test_node_norm_flag_decides_whether_the_attention_magnitude_reaches_an_answer_cell():
    """Official code: every node is L2-normalised over channels, so W2[sum(conv1(I) * a * W1 c), ...]
    sees only the sign of a at each position. Sec. 3.1's O (node_norm=False) keeps a's magnitude:
    the cell computes W2[sum_k conv1(I)_k a_k W1 c, W1 c, f_mem] exactly."""
    I, c, m = torch.randn(6, 36, 8), torch.randn(6, 8), torch.randn(6, 8)
    a = torch.randn(6, 36)
    scale = torch.rand(6, 36) + 0.5                            # new magnitudes, the same signs
    for norm in (True, False):
        cell = next(x for x in model(node_norm=norm).modules_.cells if (x.kind, x.inputs) == ("ans", 3))
        cell.alpha.data = one_hot_alpha("product", "product")
        run = lambda a: cell(I, [a], c, m, hard=True)
        assert torch.allclose(run(a), run(a * scale), atol=1e-5) == norm
        if not norm:
            want = cell.out(torch.cat([(I * a[..., None] * c[:, None]).sum(1), c, m], -1))
            assert torch.allclose(run(a), want, atol=1e-5)


def test_pooled_compare_multiplies_the_two_objects_features():
    """--compare pooled (not in the paper): a 4-input answer cell pools the image under each map on its
    own and multiplies the two, as Stack-NMN's Compare. With each map on one position it is
    W2[l2norm(I[k1] * I[k2] * W1 c), W1 c, f_mem]; it is symmetric in the maps and blind to a map's
    offset (softmax); the cell's alphas play no part. The paper's cell is neither of the last two."""
    I, c, m = torch.randn(6, 36, 8), torch.randn(6, 8), torch.randn(6, 8)
    k1, k2 = torch.randint(0, 36, (6,)), torch.randint(0, 36, (6,))
    a1, a2 = 50 * F.one_hot(k1, 36).float(), 50 * F.one_hot(k2, 36).float()
    pooled = model(compare="pooled")
    cell = next(x for x in pooled.modules_.cells if (x.kind, x.inputs) == ("ans", 4))
    rows = torch.arange(6)
    want = cell.out(torch.cat([F.normalize(I[rows, k1] * I[rows, k2] * c, dim=-1), c, m], -1))
    assert torch.allclose(cell(I, [a1, a2], c, m), want, atol=1e-5)
    a1, a2 = torch.randn(6, 36), torch.randn(6, 36)
    out = cell(I, [a1, a2], c, m)
    assert torch.allclose(out, cell(I, [a2, a1], c, m), atol=1e-5)
    assert torch.allclose(out, cell(I, [a1 + 3.0, a2 - 1.0], c, m), atol=1e-5)
    cell.alpha.data = torch.randn_like(cell.alpha)
    assert torch.allclose(out, cell(I, [a1, a2], c, m))
    assert not cell.alpha.requires_grad and all(a is not cell.alpha for a in pooled.arch_parameters())
    assert len(pooled.arch_parameters()) == len(pooled.modules_.cells) - 1  # the other cells are searched
    assert "softmax(a1)" in cell.expression()
    paper = next(x for x in model().modules_.cells if (x.kind, x.inputs) == ("ans", 4))
    paper.alpha.data = one_hot_alpha("sum", "product", "product")  # W2[sum((a1 + a2) * conv1(I) * W1 c), ...]
    assert not torch.allclose(paper(I, [a1, a2], c, m), paper(I, [a1 + 3.0, a2 - 1.0], c, m), atol=1e-3)


def test_official_stack_use_memory_and_controller():
    """Answer cells pop the maps they read and leave the stack's contents; only answer cells write the
    memory (f_mem = sum over answer modules, Sec. 2.3); c_t averages the BiLSTM states (size dim); the
    pointer is sharpened by softmax(p / 0.2) (Algorithm 1), so it stays a distribution."""
    m = model()
    kb, mem, c = torch.randn(2, 36, 8), torch.randn(2, 8), torch.randn(2, 16)
    A, p = torch.randn(2, 36, 5), F.one_hot(torch.tensor([2, 3]), 5).float()
    As, ps, ms = m.modules_(kb, A, p, mem, c)
    for i, cell in enumerate(m.modules_.cells, 1):
        if cell.kind == "ans":
            assert torch.equal(ps[..., i], sn.pop(p) if cell.inputs == 3 else sn.pop(sn.pop(p)))
            assert torch.equal(As[..., i], A) and not torch.equal(ms[..., i], torch.zeros_like(mem))
        else:
            assert torch.equal(ms[..., i], torch.zeros_like(mem))
    assert torch.equal(ms[..., 0], torch.zeros_like(mem))     # NoOp does not carry the memory over
    assert m.controller.c_0.shape == (16,) and m.halt_dim == 16
    ctx = m.encode(make_batch())
    state = m.step(ctx, m.init_state(ctx), 0)
    assert torch.allclose(state["ptr"].sum(-1), torch.ones(6)) and (state["ptr"].max(-1).values < 1).all()


def test_entropy_coefficient_schedule():
    m = model()
    for p, want in ((0.0, 1.0), (1 / 3, 0.5), (2 / 3, 0.0), (5 / 6, -0.5), (1.0, -1.0)):
        m.progress = p
        assert m.lambda_w() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("push_fix,pointers,answer_reads", [
    (True, [1, 2, 3, 4, 2], (3.0, 4.0)),                       # this code: the second object's find and filter
    (False, [0, 0, 0, 0, 0], (4.0, 4.0))])                     # the paper's pop-then-push: one register, read twice
def test_stack_rule_on_find_filter_find_filter_answer4(push_fix, pointers, answer_reads):
    """A hand-made layout, one module a step: Find (Attn3_0), Filter (Attn3_1), Find, Filter, then the
    4-input answer cell. The attention cells at step t output the map t everywhere; the pointer's slot after
    each step and the two maps (a1 under the top, a2 the top) each cell reads are recorded."""
    m = model(push_fix=push_fix)
    bank, B, K = m.modules_, 1, 36
    layout = ["Attn3_0", "Attn3_1", "Attn3_0", "Attn3_1", "Ans4_7"]
    reads, step = [], [0]

    def labelled(I, a1, a2, c, mem):                           # every cell's output at this step
        reads.append((a1[0, 0].item(), a2[0, 0].item()))
        return [torch.full((B, K), float(step[0])) if cell.kind == "attn" else torch.zeros(B, 8) for cell in bank.cells]
    bank.run_cells = labelled
    A, p = torch.zeros(B, K, 5), F.one_hot(torch.tensor([0]), 5).float()  # empty, pointer at the bottom
    kb, mem, c = torch.randn(B, K, 8), torch.zeros(B, 8), torch.randn(B, 16)
    slots = []
    for t, name in enumerate(layout, 1):
        step[0] = t
        As, ps, _ = bank(kb, A, p, mem, c)
        A, p = As[..., bank.names.index(name)], ps[..., bank.names.index(name)]
        assert torch.equal(p, F.one_hot(p.argmax(-1), 5).float())   # the pointer stays on one slot
        slots.append(p.argmax().item())
    assert slots == pointers
    assert reads[1][1] == 1.0 and reads[3][1] == 3.0           # each Filter reads the Find before it
    assert reads[4] == answer_reads                            # what the answer cell compares


def test_entropy_term_under_each_scale():
    """w(t) by hand, B = 2 examples, T = 2 steps, M = 3 modules: H = [[ln 3, 0], [ln 2, ln 3]], so the
    per-example means over t are ln 3 / 2 and (ln 2 + ln 3) / 2, and the term is -lambda_w x scale x H."""
    third, ln2, ln3 = 1 / 3, math.log(2), math.log(3)
    w = torch.tensor([[[third, third, third], [1.0, 0.0, 0.0]], [[0.5, 0.5, 0.0], [third, third, third]]])
    for progress, lam in ((0.0, 1.0), (5 / 6, -0.5)):
        for scale, want in (("mean", 1e-2 * (2 * ln3 + ln2) / 4),      # this code: 1e-2 x the batch mean
                            ("batch_sum", 1e-2 * (2 * ln3 + ln2) / 2),  # official: 1e-2 x the batch sum
                            ("paper", (2 * ln3 + ln2) / 4)):           # Algorithm 2: lambda_w / T sum_t H
            m = model(entropy_scale=scale)
            m.progress = progress
            assert m.entropy_term(w).item() == pytest.approx(-lam * want, rel=1e-6)


def test_lambda_w_code_curve():
    """The official get_entropy_coeff over the run: e = 30 p at entropy_switch 2/3 (20 epochs over the first
    2/3, 10 over the rest as the paper's curve), 1 - 2e/49 to e = 19, then 11/49 - 6 (e - 19) / 49, and -1
    from e = 29 on; at switch 1/2, e = 40 p up to p = 1/2, then 20 + 20 (p - 1/2)."""
    m = model(lambda_w_curve="code")
    for e, want in ((0, 1.0), (10, 29 / 49), (19, 11 / 49), (20, 5 / 49), (19 + 11 / 6, 0.0), (25, -25 / 49),
                    (29, -1.0), (30, -1.0)):
        m.progress = e / 30
        assert m.lambda_w() == pytest.approx(want, abs=1e-9), e
    m = model(lambda_w_curve="code", entropy_switch=0.5)
    for p, want in ((0.25, 29 / 49), (0.5, 5 / 49), (0.75, -25 / 49)):
        m.progress = p
        assert m.lambda_w() == pytest.approx(want, abs=1e-9), p


def test_init_flags_draw_the_official_distributions():
    """alpha_init_std 1e-3 (DARTS) or 1 (official); weight_init tf (Xavier-uniform, zero biases) or
    lnmn_code: Xavier-normal linears with zero biases, the 1x1 convs' biases N(0, 1), Xavier-normal LSTM
    weights with zero biases, c_0 ~ N(0, 1)."""
    sizes = dict(TINY, map_dim=64, kb_dim=64, dim=64, embed_dim=32, mem_dim=64, out_dim=64)
    tf, code = model(**sizes), model(**sizes, weight_init="lnmn_code", alpha_init_std=1.0)
    for m, std in ((tf, 1e-3), (code, 1.0)):                   # 19 nodes x 6 ops
        assert 0.8 * std < torch.cat([a.flatten() for a in m.arch_parameters()]).std() < 1.2 * std
    u = (tf.controller.u.weight, code.controller.u.weight)     # Linear(D + E, D)
    xavier_std = math.sqrt(2 / sum(u[0].shape))
    assert u[0].abs().max() <= math.sqrt(3) * xavier_std       # uniform within the Xavier bound
    assert (u[1].abs() > math.sqrt(3) * xavier_std).float().mean() > 0.05  # normal: about 8% beyond it
    for w in u:
        assert 0.9 * xavier_std < w.std() < 1.1 * xavier_std
    bank = code.modules_
    convs = [code.input.kb[0], code.input.kb[2], bank.conv1, *(c.out for c in bank.cells if c.kind == "attn")]
    assert 0.85 < torch.cat([c.bias for c in convs]).std() < 1.15  # 64 + 64 + 64 + 6 biases
    linears = [code.controller.u, code.output[0], *(c.out for c in bank.cells if c.kind == "ans")]
    assert all(torch.equal(x.bias, torch.zeros_like(x.bias)) for x in linears)
    lstm = code.input.lstm
    assert 0.9 < lstm.weight_ih_l0.std() / math.sqrt(2 / sum(lstm.weight_ih_l0.shape)) < 1.1
    assert not lstm.bias_ih_l0.any() and tf.input.lstm.bias_ih_l0.any()  # tf keeps PyTorch's LSTM init
    assert 0.7 < code.controller.c_0.std() < 1.3 and tf.controller.c_0.std() < 0.3  # tf: N(0, 1/E)
    assert not any(x.bias.any() for x in (tf.input.kb[0], tf.modules_.conv1, tf.modules_.cells[0].out))  # tf: zero


def test_the_flags_reach_the_command_line():
    argv = ["lnmn", "--entropy-scale", "paper", "--lambda-w-curve", "code", "--push-fix", "--alpha-init-std",
            "1", "--weight-init", "lnmn_code"]
    assert train.parse_args(argv)[4]["model"] == dict(entropy_scale="paper", lambda_w_curve="code", push_fix=True,
                                                      alpha_init_std=1.0, weight_init="lnmn_code")


def test_shapes_finite_gradients_and_alpha_gets_only_the_arch_terms():
    m = model().train()
    b = make_batch()
    out = m(b)
    assert out["log_probs"].shape == (6, 8)
    (F.nll_loss(out["log_probs"], b["answer"]) + out["aux_loss"] + out["arch_loss"]).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(p.grad.abs().sum() > 0 for p in m.arch_parameters())
    opt_ids = {id(p) for g in m.arch_optimizer().param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in m.arch_parameters()}
    rows = m.train_subset(1000)
    assert len(rows) == 900 and len(set(rows.tolist())) == 900


def test_alpha_step_freezes_the_weights_and_moves_the_alphas_as_before():
    """LNMN.arch_step: only the alphas require a gradient during its forward and backward (the weights'
    would be discarded), the alphas move exactly as with every parameter in the graph, no weight gets a
    gradient, and every parameter requires a gradient again after it."""
    m, b = model().train(), make_batch()
    ref = copy.deepcopy(m)
    out = ref(b)
    opt = ref.arch_optimizer()
    (F.nll_loss(out["log_probs"], b["answer"]) + out["arch_loss"]).backward()
    opt.step()
    seen = []

    def forward(batch):
        seen.append({n for n, p in m.named_parameters() if p.requires_grad})
        return m(batch)
    m.arch_step(forward, b, m.arch_optimizer(), contextlib.nullcontext())
    alphas = {n for n, p in m.named_parameters() if n.endswith(".alpha")}
    assert seen == [alphas]
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert p.requires_grad
        assert torch.allclose(p, q, rtol=0, atol=1e-7) if n in alphas else (torch.equal(p, q) and p.grad is None), n
    assert not torch.equal(m.modules_.cells[0].alpha, model().modules_.cells[0].alpha)  # it stepped


def test_overfits_one_batch():
    m = model(map_dim=16, dim=32).train()
    b = make_batch(B=8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = F.nll_loss(m(b)["log_probs"], b["answer"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_trainer_steps_alphas_on_held_out_rows(tiny_data, tmp_path, monkeypatch, capsys):
    seen = {}
    real = lnmn.LNMN.forward

    def spy(self, batch):                                      # which rows each forward reads
        seen.setdefault("rows", []).append(tuple(batch["question"][:, 1].tolist()))
        return real(self, batch)
    monkeypatch.setattr(lnmn.LNMN, "forward", spy)
    out = tmp_path / "run"
    train.main(["lnmn", "--data", str(tiny_data), "--out", str(out), "--iters", "3", "--held-out", "0.25", *TINY_FLAGS])
    monkeypatch.undo()
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["arch_optimizer"]["state"]                     # the alpha optimizer stepped, and is saved
    init = model(**{k: v for k, v in ckpt["config"]["model"].items() if k in TINY})
    alpha = ckpt["model"]["modules_.cells.0.alpha"]
    assert alpha.shape == (2, 6) and not torch.equal(alpha, torch.zeros_like(alpha))
    # alpha moved by the alpha optimizer only: the weight optimizer has no state for it
    n_weights = len([p for p in init.parameters()]) - len(init.arch_parameters())
    assert len(ckpt["optimizer"]["state"]) == n_weights
    assert len(seen["rows"]) >= 6                              # 3 weight + 3 alpha forwards (+ evaluation)
    assert "training on 180 of the 240 training questions" in capsys.readouterr().out  # 60 held out for alpha


@pytest.mark.parametrize("modules", [9, 11, 14])
def test_stack_cells_are_stack_nmn_modules_and_stay_fixed(modules, tiny_data, tmp_path):
    m = model(modules=modules, cells="stack")
    exprs = [c.expression() for c in m.modules_.cells]
    assert exprs[:2] == ["conv2(conv1(I) * W1 c)", "conv2(conv1(I) * a * W1 c)"]  # Find, Filter
    assert "conv2(min(a1, a2))" in exprs and "conv2(max(a1, a2))" in exprs       # And, Or
    assert "W2[sum(conv1(I) * a * W1 c), W1 c, f_mem]" in exprs                  # Answer
    for cell in m.modules_.cells:                              # softmax(alpha) is one-hot, and frozen
        w = lnmn.op_weights(cell.alpha)
        assert torch.allclose(w, lnmn.op_weights(cell.alpha, hard=True), atol=1e-7) and not cell.alpha.requires_grad
    assert m.arch_optimizer() is None
    if modules != 9:
        return
    out = tmp_path / "run"
    train.main(["lnmn", "--data", str(tiny_data), "--out", str(out), "--iters", "3", "--cells", "stack", *TINY_FLAGS])
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["arch_optimizer"] is None
    for i, cell in enumerate(m.modules_.cells):                # the trainer did not move them
        assert torch.equal(ckpt["model"][f"modules_.cells.{i}.alpha"], cell.alpha)
    n_weights = len([p for p in m.parameters() if p.requires_grad])
    assert len(ckpt["optimizer"]["state"]) == n_weights


def test_arch_warmup_starts_the_alpha_steps_late(tiny_data, tmp_path):
    """--arch-warmup 0.5 over one epoch of 14 iterations (216 questions, batch 16): the weights step 14
    times, the alphas 7 (from progress 7/14 on)."""
    out = tmp_path / "run"
    train.main(["lnmn", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", "--arch-warmup", "0.5",
                *TINY_FLAGS])
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {14}
    assert {int(s["step"]) for s in ckpt["arch_optimizer"]["state"].values()} == {7}
