"""Tests for dact.py: the paper's invariants (Eqs. 1-3, 9), compact and mask agree, halted rows are never
computed again, gradients, and `python train.py mac dact` (fine-tuned from a MAC with --init).
The tools that read DACT runs are tested in test_analyze.py and test_bench.py."""
import dataclasses
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import act
import dact
import mac
import train
from dact import DACT, DACTConfig, accumulate, can_halt

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--embed-dim", "8", "--max-steps", "3", "--pixel-channels", "8", "8",
        "--batch-size", "16", "--log-every", "5"]


class Counter(nn.Module):
    """A toy step model that records the ids of the rows each step computes. With `one_hot`,
    classify gives 50 * e_n at step n, so that softmax(y_n) = e_n and a_N holds Eq. (2)'s weights."""

    def __init__(self, max_steps=6, dim=8, num_answers=5, one_hot=False):
        super().__init__()
        self.max_steps, self.halt_dim, self.one_hot, self.num_answers = max_steps, dim, one_hot, num_answers
        self.cell, self.out = nn.GRUCell(dim, dim), nn.Linear(dim, num_answers)
        self.seen = []

    def encode(self, batch):
        self.seen = []
        return {"x": batch["x"], "id": batch["id"]}

    def init_state(self, ctx):
        return {"h": torch.zeros_like(ctx["x"]), "t": torch.zeros_like(ctx["id"])}

    def step(self, ctx, state, t):
        self.seen.append(ctx["id"].tolist())
        return {"h": self.cell(ctx["x"], state["h"]), "t": state["t"] + 1}

    def classify(self, ctx, state):
        if self.one_hot:
            return 50.0 * F.one_hot(state["t"] - 1, self.num_answers).float()
        return self.out(state["h"])

    def halt_input(self, ctx, state):
        return state["h"]


def toy_batch(B=64, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, dim, generator=g), "id": torch.arange(B),
            "answer": torch.randint(0, 5, (B,), generator=g)}


def spread_halting(model, scale, bias=0.0):
    """A sharper halting unit, so that examples halt at many different steps."""
    with torch.no_grad():
        model.halting_unit.weight.mul_(scale)
        model.halting_unit.bias.fill_(bias)
    return model


def tiny_mac(max_steps=6, **kw):
    cfg = mac.Config(**{**dict(dim=16, embed_dim=8, max_steps=max_steps, pixel_channels=(8, 8), read_dropout=0.0), **kw})
    info = dict(num_words=30, num_answers=8, image_kind="pixels", image_shape=(3, 32, 32))
    return mac.Model(cfg, info)


def mac_batch(B=32, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, L + 1, (B,), generator=g)
    question = torch.randint(4, 30, (B, L), generator=g) * (torch.arange(L)[None] < lens[:, None])
    return {"image": torch.rand(B, 3, 32, 32, generator=g), "question": question, "question_len": lens,
            "answer": torch.randint(0, 8, (B,), generator=g)}


# ----------------------------------------------------------------------------------------------------
# The equations

def test_eqs_1_and_2_by_hand_on_three_steps():
    """h_n from the halting unit's weights (official code: 1 - sigmoid(W c_n + b)), y_n the softmax of
    the step's logits, then p_n (Eq. 1) and a_n (Eq. 2) written out for N = 3: the trace must agree."""
    torch.manual_seed(0)
    model = spread_halting(DACT(tiny_mac(max_steps=3), DACTConfig()), 5.0, bias=0.5).eval()
    batch = mac_batch()
    tr = model.trace(batch)
    W, b = model.halting_unit.weight[0], model.halting_unit.bias[0]       # (D,), ()
    with torch.no_grad():                                                # eval: no dropout, the same steps
        inner = model.inner
        ctx = inner.encode(batch)
        state, h, y = inner.init_state(ctx), [], []
        for t in range(3):
            state = inner.step(ctx, state, t)
            h.append(1 - torch.sigmoid(state["control"] @ W + b))        # (B,) h_n, c_n the new control
            y.append(inner.classify(ctx, state).softmax(-1))             # (B, A) y_n
    p1, p2, p3 = h[0], h[0] * h[1], h[0] * h[1] * h[2]                   # Eq. (1), p_0 = 1
    a1 = y[0]                                                            # Eq. (2): y_1 p_0 + a_0 (1 - p_0)
    a2 = y[1] * p1[:, None] + a1 * (1 - p1[:, None])
    a3 = y[2] * p2[:, None] + a2 * (1 - p2[:, None])
    assert torch.allclose(tr["h"], torch.stack(h, 1), atol=1e-6)
    assert torch.allclose(tr["y"], torch.stack(y, 1), atol=1e-6)
    assert torch.allclose(tr["p"], torch.stack([p1, p2, p3], 1), atol=1e-6)
    assert torch.allclose(tr["a"], torch.stack([a1, a2, a3], 1), atol=1e-6)
    assert 0.05 < p1.min() and p3.max() < 0.95                           # no p_n or h_n at an extreme
    # and over six steps: p_n = prod_{i <= n} h_i (Eq. 1)
    tr6 = spread_halting(DACT(tiny_mac(), DACTConfig()), 5.0).eval().trace(batch)
    assert torch.allclose(tr6["p"], tr6["h"].cumprod(dim=1))


@pytest.mark.parametrize("N", [1, 2, 5, 12])
def test_eq2_weights_on_each_y_n_sum_to_one(N):
    """With y_n = e_n, a_N is the vector of weights that Eq. (2) puts on y_1..y_N."""
    g = torch.Generator().manual_seed(N)
    B = 200
    h = torch.sigmoid(torch.randn(B, N, 1, generator=g) * 4)
    h[:10] = 0.0                                                         # the extremes too
    h[10:20] = 1.0
    a, p, ps = 0.0, 1.0, [torch.ones(B)]
    for n in range(N):
        a, p = accumulate(a, p, F.one_hot(torch.tensor(n), N).float().expand(B, N), h[:, n])
        ps.append(p[:, 0])
    assert torch.allclose(a.sum(-1), torch.ones(B), atol=1e-6)
    assert (a >= 0).all()
    # closed form: w_n = p_{n-1} prod_{k=n}^{N-1} (1 - p_k)
    w = torch.stack([ps[n - 1] * torch.stack([1 - ps[k] for k in range(n, N)] + [torch.ones(B)]).prod(0)
                     for n in range(1, N + 1)], dim=1)
    assert torch.allclose(a, w, atol=1e-6)


def test_eq2_weights_through_the_model():
    torch.manual_seed(0)
    model = spread_halting(DACT(Counter(num_answers=6, one_hot=True), DACTConfig()), 3.0).train()
    batch = toy_batch()
    weights = model(batch)["log_probs"].exp()                            # a_N = sum_n w_n e_n
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights)), atol=1e-5)
    p = torch.cat([torch.ones(len(weights), 1), model.trace(batch)["p"]], dim=1)  # p_0..p_N
    w = torch.stack([p[:, n - 1] * (1 - p[:, n:6]).prod(1) for n in range(1, 7)], dim=1)
    assert torch.allclose(weights, w, atol=1e-5)


def test_eq9_halting_never_changes_the_answer():
    """Property test over 14,000 random (y_n, h_n) sequences: once Eq. (9) holds at step n, the argmax
    of a_m is that of a_n for every later m, in particular of a_N (all N steps)."""
    g = torch.Generator().manual_seed(0)
    cases = early = 0
    for N in (1, 2, 3, 5, 8, 12, 15):
        for A in (2, 3, 10, 28):
            B = 500
            sharp = 10 ** (torch.rand(B, 1, 1, generator=g) * 3 - 1)     # softmax temperatures 0.1 .. 100
            y = (torch.randn(B, N, A, generator=g) * sharp).softmax(-1)
            h = torch.sigmoid(torch.randn(B, N, 1, generator=g) * 4 + torch.rand(B, 1, 1, generator=g) * 8 - 6)
            a, p, steps = 0.0, 1.0, []
            for n in range(N):
                a, p = accumulate(a, p, y[:, n], h[:, n])
                steps.append((a, p))
            halted, answer = torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.long)
            for n, (a, p) in enumerate(steps, 1):
                now = can_halt(a, p, N - n) & ~halted
                answer[now] = a[now].argmax(-1)
                halted |= now
                early += int(now.sum()) if n < N else 0
                assert torch.equal(a[halted].argmax(-1), answer[halted]), (N, A, n)  # every later a_m agrees
            assert halted.all()                                          # d = 0 always halts
            cases += B
    assert cases >= 10_000 and early > 0.3 * cases                       # most sequences stop early


# ----------------------------------------------------------------------------------------------------
# Halting at inference: the same answers as all N steps, compact and mask agree, halted rows never computed again

def test_halting_never_changes_the_models_answer():
    """Sec. 3.2's aim, through the model: on 3,072 examples of toy models whose steps answer at random
    (y_n: random logits of random sharpness) and halt anywhere in 1..10, the answer where Eq. (9) stops
    is the argmax of a_N after all N steps. Exactly so in exact arithmetic; rows whose a_N top two lie
    within 1e-5 (float rounding could flip them) are exempt."""
    N, A, B = 10, 4, 512
    checked = early = 0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(B, N, A, generator=g) * 10 ** (torch.rand(B, 1, 1, generator=g) * 2 - 0.5)
        inner = Counter(max_steps=N, num_answers=A)
        inner.classify = lambda ctx, state, logits=logits: logits[ctx["id"], state["t"] - 1]  # (b, A)
        torch.manual_seed(seed)
        model = spread_halting(DACT(inner, DACTConfig()), 4.0, bias=0.4 * seed - 1.0).eval()
        batch = toy_batch(B=B, seed=seed)
        with torch.no_grad():
            out = model(batch)
        a_N = model.trace(batch)["a"][:, -1]                             # (B, A) all N steps
        top = a_N.topk(2, dim=-1).values
        clear = top[:, 0] - top[:, 1] > 1e-5
        assert torch.equal(out["log_probs"].argmax(1)[clear], a_N.argmax(1)[clear]), seed
        checked, early = checked + int(clear.sum()), early + int((out["steps"] < N).sum())
    assert checked > 0.99 * 6 * B and early > 0.3 * 6 * B                # most rows counted, many halt early


def test_compact_and_mask_give_the_same_predictions():
    """The same predictions in exact arithmetic; their log-probabilities may differ by float rounding
    (about 1e-7: compact runs rows in smaller batches), so a near-tie can flip (none here)."""
    torch.manual_seed(0)
    model = spread_halting(DACT(tiny_mac(), DACTConfig()), 30.0, bias=2.0).eval()
    batch = mac_batch(B=48)
    with torch.no_grad():
        out = {}
        for halt in ("compact", "mask"):
            model.cfg = dataclasses.replace(model.cfg, halt=halt)
            out[halt] = model(batch)
    tr = model.trace(batch)
    c, m = out["compact"], out["mask"]
    assert len(set(c["steps"].tolist())) >= 3, c["steps"]                # the test needs varied halting
    assert torch.equal(c["steps"], m["steps"])
    assert torch.equal(c["log_probs"].argmax(1), m["log_probs"].argmax(1))
    assert torch.allclose(c["log_probs"], m["log_probs"], atol=1e-5)
    assert torch.allclose(c["aux_loss"], m["aux_loss"], atol=1e-6)
    # and both are the all-steps trace stopped where Eq. (9) first holds, with a_N's answer
    assert torch.equal(c["steps"].long(), tr["halt_step"])
    a_halt = tr["a"][torch.arange(48), tr["halt_step"] - 1]
    assert torch.allclose(c["log_probs"], a_halt.clamp(min=1e-8).log(), atol=1e-5)
    assert torch.equal(c["log_probs"].argmax(1), tr["a"][:, -1].argmax(1))


@pytest.mark.parametrize("halt", ["compact", "mask"])
def test_a_halted_example_is_never_computed_again(halt):
    torch.manual_seed(0)
    inner = Counter(max_steps=8)
    model = spread_halting(DACT(inner, DACTConfig(halt=halt)), 6.0, bias=1.0).eval()
    with torch.no_grad():
        steps = model(toy_batch())["steps"].long()
    assert len(set(steps.tolist())) >= 3, steps
    assert len(inner.seen) == int(steps.max())
    for n, rows in enumerate(inner.seen, 1):
        if halt == "compact":                                            # exactly the rows still running
            assert sorted(rows) == [i for i in range(64) if steps[i] >= n], n
        else:                                                            # the official code: every row
            assert sorted(rows) == list(range(64))
    if halt == "compact":
        assert sum(map(len, inner.seen)) == int(steps.sum())


def test_training_runs_all_steps_with_finite_gradients():
    torch.manual_seed(0)
    inner = tiny_mac(stem_dropout=0.0, question_dropout=0.0, memory_dropout=0.0, output_dropout=0.0)
    model = spread_halting(DACT(inner, DACTConfig(tau=0.1)), 3.0).train()
    batch = mac_batch(B=8)
    out = model(batch)
    assert torch.equal(out["steps"], torch.full((8,), 6.0))
    tr = model.trace(batch)                                              # no dropout: the same numbers
    assert torch.allclose(out["log_probs"], tr["a"][:, -1].log(), atol=1e-5)
    assert torch.allclose(out["aux_loss"], 0.1 * tr["p"].sum(1).mean(), atol=1e-6)  # tau * mean(rho), Eq. (3)
    loss = F.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.halting_unit.weight.grad.abs().sum() > 0


def test_max_steps_beyond_the_inner_model_fails_clearly():
    with pytest.raises(ValueError, match="--max-steps 8"):
        DACT(tiny_mac(max_steps=6), DACTConfig(halt_max_steps=8))
    assert DACT(tiny_mac(max_steps=6), DACTConfig(halt_max_steps=4)).max_steps == 4


def test_wrapper_flags_do_not_clash_with_the_models_or_trainer():
    """train.py makes one flag namespace of the trainer's, the model's and the wrapper's fields."""
    models = [importlib.import_module(m).Config for m in train.MODELS.values() if importlib.util.find_spec(m)]
    for model_cfg in models:
        taken = {f.name for cls in (model_cfg, train.TrainConfig, train.Recipe) for f in dataclasses.fields(cls)}
        for cls in (dact.Config, act.Config):
            assert not taken & {f.name for f in dataclasses.fields(cls)}, (model_cfg, cls)


# ----------------------------------------------------------------------------------------------------
# Command lines

def test_cli_train_dact_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "dact"
    cmd = [sys.executable, str(ROOT / "train.py"), "mac", "dact", "--tau", "5e-3", "--data", str(tiny_data),
           "--iters", "3", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"][-1]
    assert 1 <= val["avg_steps"] <= 3 and val["iter"] == 3
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["wrapper_name"] == "dact" and ckpt["config"]["wrapper"]["tau"] == 5e-3


@pytest.fixture(scope="module")
def dact_run(tiny_data, tmp_path_factory):
    """A MAC run, then DACT fine-tuned from it with --init (as the paper)."""
    root = tmp_path_factory.mktemp("dact-runs")
    train.main(["mac", "--data", str(tiny_data), "--out", str(root / "mac"), "--iters", "3", *TINY])
    train.main(["mac", "dact", "--data", str(tiny_data), "--out", str(root / "dact"), "--iters", "2",
                "--init", str(root / "mac" / "best.pt"), *TINY])
    return root


def test_init_from_mac_reports_the_halting_unit_as_new(dact_run):
    log = (dact_run / "dact" / "run.json").read_text()
    assert json.loads(log)["wrapper"] == "dact"
    ckpt = torch.load(dact_run / "dact" / "best.pt", map_location="cpu", weights_only=True)
    mac_ckpt = torch.load(dact_run / "mac" / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["prefix"] == "inner." and "halting_unit.weight" in ckpt["ema"]
    assert set(ckpt["ema"]) - {"inner." + k for k in mac_ckpt["ema"]} == {"halting_unit.weight", "halting_unit.bias"}


def test_init_prints_the_new_parameters(dact_run, tiny_data, tmp_path, capsys):
    train.main(["mac", "dact", "--data", str(tiny_data), "--out", str(tmp_path / "again"), "--iters", "1",
                "--init", str(dact_run / "mac" / "best.pt"), *TINY])
    missing = next(line for line in capsys.readouterr().out.splitlines() if "missing keys" in line)
    assert missing.endswith("halting_unit.weight, halting_unit.bias"), missing
