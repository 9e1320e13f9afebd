"""Tests for act.py: Graves' halting rule, weights that sum to 1, ponder cost N + R, halted rows never
computed again, batched == per-example, gradients, and `python train.py mac act` end to end."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import mac
import train
from act import ACT, ACTConfig

TINY = ["--dim", "16", "--embed-dim", "8", "--max-steps", "3", "--pixel-channels", "8", "8",
        "--batch-size", "16", "--log-every", "5"]


class Counter(nn.Module):
    """A toy step model that records the ids of the rows each step computes. With `one_hot`, classify
    gives e_n at step n (and 0 for the last answer), so that ACT's output sum_n p_n y_n is its weights."""

    def __init__(self, max_steps=6, dim=8, one_hot=False):
        super().__init__()
        self.max_steps, self.halt_dim, self.one_hot = max_steps, dim, one_hot
        self.cell, self.out = nn.GRUCell(dim, dim), nn.Linear(dim, max_steps + 1)
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
            return F.one_hot(state["t"] - 1, self.max_steps + 1).float()
        return self.out(state["h"])

    def halt_input(self, ctx, state):
        return state["h"]


def toy_batch(B=64, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, dim, generator=g), "id": torch.arange(B)}


def toy_act(scale=4.0, bias=-1.0, one_hot=True, **kw):
    torch.manual_seed(0)
    model = ACT(Counter(one_hot=one_hot), ACTConfig(**kw))
    with torch.no_grad():                                                # halting at many different steps
        model.halting_unit.weight.mul_(scale)
        model.halting_unit.bias.fill_(bias)
    return model


def tiny_mac(**kw):
    cfg = mac.Config(**{**dict(dim=16, embed_dim=8, max_steps=6, pixel_channels=(8, 8), read_dropout=0.0), **kw})
    return mac.Model(cfg, dict(num_words=30, num_answers=8, image_kind="pixels", image_shape=(3, 32, 32)))


def mac_batch(B=16, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, L + 1, (B,), generator=g)
    question = torch.randint(4, 30, (B, L), generator=g) * (torch.arange(L)[None] < lens[:, None])
    return {"image": torch.rand(B, 3, 32, 32, generator=g), "question": question, "question_len": lens,
            "answer": torch.randint(0, 8, (B,), generator=g)}


def test_weights_sum_to_one_and_ponder_is_n_plus_r():
    model = toy_act(tau=0.5)
    hs = []
    model.halting_unit.register_forward_hook(lambda m, i, o: hs.append(torch.sigmoid(o[:, 0]).detach()))
    with torch.no_grad():
        out = model(toy_batch())
    B, M, eps = 64, model.max_steps, model.cfg.halt_eps
    lp = out["log_probs"]
    w = lp[:, :M] - lp[:, M:]                                            # the weight p_n of y_n = e_n
    assert torch.allclose(w.sum(1), torch.ones(B), atol=1e-5)
    assert (w > -1e-6).all()
    steps = out["steps"].long()
    assert len(set(steps.tolist())) >= 3, steps                          # the test needs varied halting
    h = torch.full((B, M), float("nan"))                                 # h_n of each example, from the hook
    for n, (ids, h_n) in enumerate(zip(model.inner.seen, hs)):
        h[ids, n] = h_n
    for i in range(B):
        N = int(steps[i])
        cum = h[i, :N].cumsum(0)
        assert N == M or cum[-1] >= 1 - eps                              # N(t): the first n with sum h >= 1 - eps
        assert N == 1 or cum[-2] < 1 - eps
        R = 1 - h[i, :N - 1].sum()                                       # the remainder
        assert torch.allclose(w[i, :N - 1], h[i, :N - 1], atol=1e-5)     # p_n = h_n before N(t)
        assert torch.isclose(w[i, N - 1], R, atol=1e-5)                  # p_N = R(t)
        assert torch.allclose(w[i, N:], torch.zeros(M - N), atol=1e-5)   # nothing after the halt
        assert torch.isclose(out["ponder"][i], N + R, atol=1e-5)         # rho = N(t) + R(t)
    assert torch.isclose(out["aux_loss"], 0.5 * out["ponder"].mean())


def test_a_halted_example_is_never_computed_again():
    model = toy_act(one_hot=False)
    with torch.no_grad():
        steps = model(toy_batch())["steps"].long()
    assert len(set(steps.tolist())) >= 3, steps
    for n, rows in enumerate(model.inner.seen, 1):
        assert sorted(rows) == [i for i in range(64) if steps[i] >= n], n
    assert sum(map(len, model.inner.seen)) == int(steps.sum())


def test_batched_equals_one_example_at_a_time():
    torch.manual_seed(0)
    model = ACT(tiny_mac(), ACTConfig()).eval()
    with torch.no_grad():
        model.halting_unit.weight.mul_(10)                               # varied halting steps
        batch = mac_batch()
        out = model(batch)
        for i in range(len(batch["answer"])):
            one = model({k: v[i:i + 1] for k, v in batch.items()})
            assert torch.allclose(one["log_probs"][0], out["log_probs"][i], atol=1e-5), i
            assert one["steps"][0] == out["steps"][i]
    assert len(set(out["steps"].tolist())) >= 2, out["steps"]


def test_finite_gradients_and_the_ponder_cost_reaches_the_halting_unit():
    torch.manual_seed(0)
    model = ACT(tiny_mac(), ACTConfig(tau=1e-2, halt_eps=0.5)).train()  # a large eps: N(t) > 1 is common
    batch = mac_batch(B=8)
    out = model(batch)
    assert torch.isfinite(out["aux_loss"])
    out["aux_loss"].backward(retain_graph=True)                          # through R(t) alone
    assert model.halting_unit.weight.grad.abs().sum() > 0
    F.nll_loss(out["log_probs"], batch["answer"]).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.inner.output.mlp[-1].weight.grad.abs().sum() > 0


def test_max_steps_beyond_the_inner_model_fails_clearly():
    with pytest.raises(ValueError, match="--max-steps 9"):
        ACT(tiny_mac(), ACTConfig(halt_max_steps=9))


def test_cli_train_act_end_to_end(tiny_data, tmp_path):
    train.main(["mac", "act", "--tau", "1e-3", "--data", str(tiny_data), "--out", str(tmp_path / "act"),
                "--iters", "3", *TINY])
    val = [json.loads(line) for line in (tmp_path / "act" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"][-1]
    assert 1 <= val["avg_steps"] <= 3
    assert val["n"] == len(data.Split(tiny_data, "val"))                 # every val question, once
