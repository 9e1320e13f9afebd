"""Tests for mac.py: shapes, gradients, the padding mask, the step protocol, the fast form of Eq. (5),
overfitting (CPU, seconds)."""
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mac  # noqa: E402
from mac import MAC, MACConfig  # noqa: E402
import train  # noqa: E402

NUM_WORDS, NUM_ANSWERS = 30, 8
SHAPES = {"pixels": (3, 32, 32), "features": (1024, 14, 14)}


def tiny_cfg(**kw):
    return MACConfig(**{**dict(dim=16, embed_dim=8, max_steps=3, pixel_channels=(8, 8)), **kw})


def make_model(kind="pixels", **kw):
    info = dict(num_words=NUM_WORDS, num_answers=NUM_ANSWERS, image_kind=kind, image_shape=SHAPES[kind])
    return MAC(tiny_cfg(**kw), info)


def make_batch(B=4, kind="pixels", lens=None, L=10, seed=0):
    """Questions as data.py makes them: <START> words <END>, then 0-padding up to L."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens if lens is not None else [L - 3 * (i % 3) for i in range(B)])
    question = torch.randint(4, NUM_WORDS, (B, L), generator=g)
    question[:, 0] = 1
    question[torch.arange(B), lens - 1] = 2
    question = question * (torch.arange(L)[None] < lens[:, None])
    image = torch.rand(B, *SHAPES[kind], generator=g)
    if kind == "features":
        image = image * 2                                      # ResNet features are >= 0, unnormalised
    answer = torch.randint(0, NUM_ANSWERS, (B,), generator=g)
    return dict(image=image, question=question, question_len=lens, answer=answer,
                family=torch.zeros(B, dtype=torch.long))           # keys the model must ignore


def run_protocol(model, batch):
    ctx = model.encode(batch)
    state = model.init_state(ctx)
    states = []
    for t in range(model.max_steps):
        state = model.step(ctx, state, t)
        states.append(state)
    return ctx, states, model.classify(ctx, state)


def test_registry_names_and_presets():
    assert mac.Config is MACConfig and mac.Model is MAC
    fields = {f.name for f in dataclasses.fields(MACConfig)}
    trainer = {f.name for cls in (train.TrainConfig, train.Recipe) for f in dataclasses.fields(cls)}
    for name, preset in mac.PRESETS.items():
        assert set(preset) <= fields | trainer, name  # the rest of a preset sets the recipe or the trainer
        MACConfig(**{k: v for k, v in preset.items() if k in fields})


def test_the_default_config_builds_the_papers_clevr_model():
    """MACConfig() on CLEVR's ResNet features: a 196-cell knowledge base of d = 512, 12 steps, plain
    write unit (no self-attention, no gate), one variational memory mask per example (keep 0.85)."""
    torch.manual_seed(0)
    info = dict(num_words=NUM_WORDS, num_answers=NUM_ANSWERS, image_kind="features", image_shape=SHAPES["features"])
    model = MAC(MACConfig(), info).eval()
    batch = make_batch(B=2, kind="features")
    with torch.no_grad():
        ctx, states, logits = run_protocol(model, batch)
        assert ctx["knowledge"].shape == (2, 196, 512) and ctx["words"].shape == (2, 10, 512)
        assert len(states) == 12 and logits.shape == (2, NUM_ANSWERS)
        with pytest.raises(IndexError):
            model.step(ctx, states[-1], 12)
        assert set(states[-1]) == {"control", "memory", "control_attn", "read_attn"}  # no history kept
        assert not hasattr(model.write, "gate") and not hasattr(model.write, "sa_attn")
        assert model.read.drop.p == 0.15                                  # the official codes' read dropout
        mask = model.train().encode(batch)["memory_mask"]                   # (2, 512)
    assert torch.allclose(mask.unique(), torch.tensor([0.0, 1 / 0.85]))


@pytest.mark.parametrize("kind", ["pixels", "features"])
def test_shapes_and_log_probs(kind):
    torch.manual_seed(0)
    model = make_model(kind)
    batch = make_batch(B=2 if kind == "features" else 4, kind=kind)
    out = model(batch)["log_probs"]
    assert out.shape == (len(batch["answer"]), NUM_ANSWERS)
    assert torch.allclose(out.exp().sum(-1), torch.ones(len(out)), atol=1e-5)
    ctx = model.encode(batch)
    K = 14 * 14 if kind == "features" else 8 * 8               # 32 -> 16 -> 8 with two stride-2 convs
    assert ctx["knowledge"].shape == (len(out), K, 16)
    assert ctx["words"].shape == (len(out), batch["question"].size(1), 16)


@pytest.mark.parametrize("kind,options", [
    ("pixels", {}), ("features", {}),
    ("pixels", dict(self_attention=True)), ("pixels", dict(memory_gate=True)),
    ("pixels", dict(self_attention=True, memory_gate=True)),
])
def test_finite_loss_and_grads_reach_every_parameter(kind, options):
    torch.manual_seed(0)
    model = make_model(kind, **options).train()
    batch = make_batch(B=2 if kind == "features" else 4, kind=kind)
    loss = F.nll_loss(model(batch)["log_probs"], batch["answer"])
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("attn.bias"):  # a constant added before a softmax: its gradient is 0
            continue
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_control_attention_ignores_padding():
    torch.manual_seed(0)
    model = make_model(self_attention=True).train()            # train: dropout on, mask must still hold
    batch = make_batch(B=4, lens=[10, 6, 3, 8], L=10)
    ctx, states, _ = run_protocol(model, batch)
    pad = torch.arange(10)[None] >= batch["question_len"][:, None]
    assert torch.equal(ctx["word_mask"], ~pad)
    for s in states:
        cv = s["control_attn"]
        assert (cv[pad] == 0).all()
        assert (cv[~pad] > 0).all()
        assert torch.allclose(cv.sum(-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(s["read_attn"].sum(-1), torch.ones(4), atol=1e-5)


def test_extra_padding_changes_nothing():
    torch.manual_seed(0)
    model = make_model(self_attention=True, memory_gate=True).eval()
    batch = make_batch(B=4, lens=[10, 6, 3, 8], L=10)
    longer = dict(batch, question=F.pad(batch["question"], (0, 7)))   # 7 more <NULL> columns
    with torch.no_grad():
        a, b = model(batch)["log_probs"], model(longer)["log_probs"]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_forward_is_the_protocol_loop(train):
    torch.manual_seed(0)
    model = make_model(self_attention=True, memory_gate=True).train(train)
    batch = make_batch()
    torch.manual_seed(1)
    out = model(batch)["log_probs"]
    torch.manual_seed(1)                                       # same dropout draws in the same order
    ctx, states, logits = run_protocol(model, batch)
    assert len(states) == model.max_steps == 3
    assert torch.allclose(out, logits.log_softmax(-1), atol=1e-6)
    assert torch.equal(model.halt_input(None, states[-1]), states[-1]["control"])
    assert states[-1]["controls"].shape == states[-1]["memories"].shape == (4, 4, 16)  # c_0..c_3
    with pytest.raises(IndexError):
        model.step(ctx, states[-1], model.max_steps)              # no projection W_i for this step


@pytest.mark.parametrize("train", [False, True])
def test_indexing_rows_commutes_with_step(train):
    """What DACT compaction relies on: step(ctx[idx], state[idx]) == step(ctx, state)[idx]."""
    torch.manual_seed(0)
    model = make_model(self_attention=True, memory_gate=True, memory_dropout=0.5, read_dropout=0.0).train(train)
    batch = make_batch(B=4, lens=[10, 6, 3, 8])
    with torch.no_grad():
        ctx = model.encode(batch)
        if train:                                              # variational mask: one per example
            assert set(ctx["memory_mask"].unique().tolist()) == {0.0, 2.0}
        state = model.step(ctx, model.init_state(ctx), 0)
        full = model.step(ctx, state, 1)
        again = model.step(ctx, state, 1)                      # the step itself draws no new dropout
        idx = torch.tensor([2, 0])
        sub_ctx = {k: v[idx] for k, v in ctx.items()}
        sub = model.step(sub_ctx, {k: v[idx] for k, v in state.items()}, 1)
    assert set(sub) == set(full)
    for k in full:
        assert torch.equal(full[k], again[k]), k
        assert torch.allclose(sub[k], full[k][idx], atol=1e-6), k
    if not train:
        assert torch.allclose(model.classify(sub_ctx, sub), model.classify(ctx, full)[idx], atol=1e-6)


def test_overfits_one_small_batch():
    torch.manual_seed(0)
    model = make_model(dim=32, stem_dropout=0.0, question_dropout=0.0, memory_dropout=0.0,
                       output_dropout=0.0, read_dropout=0.0).train()
    batch = make_batch(B=16, L=8, seed=1)
    batch["image"] = batch["image"][:, :, :16, :16].contiguous()   # smaller images: faster
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        loss = F.nll_loss(model(batch)["log_probs"], batch["answer"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


def test_read_unit_fast_eq5_equals_the_literal_concatenation():
    """Eq. (5), I' = W [I; W_k k] + b: the read unit splits W and precomputes its W_k k half once per
    image; values and gradients must equal those of the literal self.concat(torch.cat([I, k_proj], -1))."""
    torch.manual_seed(0)
    read = make_model(read_dropout=0.0).read                              # no dropout: a deterministic unit
    B, K, D = 3, 5, 16
    inputs = [torch.randn(B, D), torch.randn(B, K, D), torch.randn(B, D)]  # m_prev, k, c_i
    k_mask = torch.tensor([[True] * K, [True, True, False, False, False], [True] * 4 + [False]])

    def literal(m_prev, k, c_i):
        k_proj = read.kb_proj(k)                                          # (B, K, D)
        I = read.mem_proj(m_prev)[:, None] * k_proj                       # Eq. (4)
        I = read.concat(torch.cat([I, k_proj], -1))                       # Eq. (5), as written
        ra = read.attn(F.elu(read.concat2(F.elu(I)) * c_i[:, None])).squeeze(-1)
        rv = ra.masked_fill(~k_mask, float("-inf")).softmax(-1)           # (B, K)
        return (rv[..., None] * k).sum(1), rv

    def fast(m_prev, k, c_i):
        k_proj, k_half = read.precompute(k)
        return read(m_prev, k, k_proj, k_half, c_i, k_mask)

    results = []
    for f in (fast, literal):
        xs = [x.clone().requires_grad_() for x in inputs]
        r_i, rv = f(*xs)
        wanted = [*xs, *read.parameters()]
        grads = torch.autograd.grad((r_i * torch.arange(D)).sum() + (rv * torch.arange(K)).sum(), wanted)
        results.append((r_i, rv, grads))
    (r_a, rv_a, g_a), (r_b, rv_b, g_b) = results
    assert torch.allclose(r_a, r_b, atol=1e-6) and torch.allclose(rv_a, rv_b, atol=1e-6)
    assert (rv_a[~k_mask] == 0).all()
    names = ["m_prev", "k", "c_i"] + [n for n, _ in read.named_parameters()]
    for name, a, b in zip(names, g_a, g_b):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name


def test_read_dropout_is_redrawn_every_step_and_off_at_evaluation():
    """DACT-MAC's placement: a new mask on the knowledge base at every step (so W_k k is computed again)
    and one before the attention layer; at evaluation the once-per-question precompute is exact."""
    torch.manual_seed(0)
    quiet = dict(stem_dropout=0.0, question_dropout=0.0, memory_dropout=0.0, output_dropout=0.0)
    model, plain = make_model("features", read_dropout=0.5, **quiet), make_model("features", read_dropout=0.0, **quiet)
    plain.load_state_dict(model.state_dict())
    batch = make_batch(B=2, kind="features")
    calls = []
    original = mac.ReadUnit.precompute
    def counting(self, k):
        calls.append(k)
        return original(self, k)
    mac.ReadUnit.precompute = counting
    try:
        with torch.no_grad():
            evaluated = model.eval()(batch)["log_probs"]
            assert len(calls) == 1                               # evaluation: once per question
            assert torch.equal(evaluated, plain.eval()(batch)["log_probs"])
            calls.clear()
            ctx, states, _ = run_protocol(model.train(), batch)
    finally:
        mac.ReadUnit.precompute = original
    assert len(calls) == 1 + model.max_steps                   # training: again at every step
    dropped = [(k == 0).float().mean().item() for k in calls[1:]]
    assert all(0.3 < d < 0.7 for d in dropped)                 # about half of k zeroed, p = 0.5
    assert not torch.equal(calls[1], calls[2])                 # a new mask at every step
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(batch)["log_probs"]
        torch.manual_seed(4)
        b = model(batch)["log_probs"]
        c = plain.train()(batch)["log_probs"]
        d = plain(batch)["log_probs"]
    assert not torch.allclose(a, b) and torch.equal(c, d)     # only the read dropout draws here


def test_official_init_of_the_stem_convs_and_the_word_embeddings():
    torch.manual_seed(0)
    model, legacy = make_model("features"), make_model("features", official_init=False)
    conv = model.input.stem.net[1]                                  # 1024 -> 16, 3x3
    bound = (6 / (conv.in_channels * 9 + conv.out_channels * 9)) ** 0.5  # Xavier-uniform
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert (conv.bias == 0).all() and (legacy.input.stem.net[1].bias != 0).any()  # PyTorch's default bias
    emb = model.input.embed.weight
    bound = (6 / (NUM_WORDS + emb.size(1))) ** 0.5
    assert emb.abs().max() <= bound and (emb[0] == 0).all()     # <NULL> stays the zero padding row
    assert legacy.input.embed.weight.abs().max() > bound        # N(0, 1)


def test_the_classifier_is_the_official_1024_512_answers_and_output_dim_sets_its_width():
    """Official code: [m_T; W q] (2d = 1024) -> 512 -> answers; output_dim sets that width apart from d."""
    info = dict(num_words=NUM_WORDS, num_answers=NUM_ANSWERS, image_kind="features", image_shape=SHAPES["features"])
    widths = lambda m: [(l.in_features, l.out_features) for l in m.output.mlp if isinstance(l, nn.Linear)]
    assert widths(MAC(MACConfig(), info)) == [(1024, 512), (512, NUM_ANSWERS)]
    assert widths(make_model("features")) == [(2 * 16, 16), (16, NUM_ANSWERS)]  # 0: d
    model = make_model("features", output_dim=512)
    assert widths(model) == [(2 * 16, 512), (512, NUM_ANSWERS)]
    assert model(make_batch(B=3, kind="features"))["log_probs"].shape == (3, NUM_ANSWERS)


@pytest.mark.parametrize("gate,kept", [("dact", "old"), ("tf", "new")])
def test_memory_gate_starts_at_73_percent_of_the_gated_memory(gate, kept):
    """Eq. (9) with the +1 of both official codes: sigmoid(1) = 0.731 at the start (gate weights 0)."""
    torch.manual_seed(0)
    write = make_model(memory_gate=True, gate=gate).write
    torch.nn.init.zeros_(write.gate.weight)
    assert write.gate.out_features == (1 if gate == "dact" else 16)  # the paper's scalar, TF's per dimension
    r, m_prev, c = torch.randn(3, 4, 16).unbind(0)
    m_new = write.info(torch.cat([r, m_prev], -1))
    z = torch.sigmoid(torch.tensor(1.0))
    gated, other = (m_prev, m_new) if kept == "old" else (m_new, m_prev)
    assert torch.allclose(write(r, m_prev, c), z * gated + (1 - z) * other, atol=1e-6)
