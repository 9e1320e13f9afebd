"""DACT: Differentiable Adaptive Computation Time, around any model with the step protocol.

Paper: C. Eyzaguirre, A. Soto, "Differentiable Adaptive Computation Time for Visual Reasoning",
CVPR 2020, arXiv:2004.12770. Official code: ceyzaguirre4/DACT-MAC (PyTorch).

This file holds the DACT wrapper: Eqs. (1)-(4) for training, the halting rule of Eq. (9) for
inference, with halted examples really dropped from the batch. Evaluating, benchmarking and plotting
trained runs are tools outside it (`python analyze.py eval | dact-plot`, `python bench.py dact`).

    python train.py mac dact --tau 5e-3 --max-steps 12 --init runs/mac12/best.pt   # fine-tune, as the paper
    python dact.py                                   # smoke run on a toy step model

The wrapped model (see DESIGN.md) exposes encode(batch) -> ctx, init_state(ctx) -> state,
step(ctx, state, t) -> state, classify(ctx, state) -> logits, halt_input(ctx, state) -> (B, D),
max_steps, and the size D as `halt_dim` (or `cfg.dim`, as MAC). ctx and state are dicts (or
tuples) of tensors with the batch first.

Shapes:
    B  batch (b: the rows still running)   A  answers   D  size of halt_input
    N  maximum number of steps (n: the current step, 1-based as in the paper; d = N - n steps left)
    y_n, a_n (b, A): the step's answer (a softmax) and the accumulated answer
    h_n, p_n, rho (b, 1): the halting value, the probability that later steps still count, the ponder cost

Parts in the paper's order: the halting value h_n (Sec. 3), p_n (Eq. 1) and a_n (Eq. 2) in
`accumulate`; the ponder cost (Eq. 3) and the loss (Eq. 4) in `DACT.all_steps`; the halting condition
(Eqs. 5-9, Sec. 3.2) in `can_halt`, used by `DACT.halting_steps`.
"""
import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn


@dataclass
class DACTConfig:
    tau: float = 5e-3  # Eq. (4) time penalty: Fig. 7's; official configs' grid 0, 1e-3, 5e-3, 1e-2, 5e-2
    # NOTE (deviation): the default, compact, is not the official code's way (mask); the same predictions
    halt: Literal["compact", "mask"] = "compact"  # Sec. 3.2, inference: compact drops halted rows; mask keeps them
    halt_max_steps: int = 0  # N (Sec. 4: 12, and 15 for the best model); 0: the inner model's max_steps


# ----------------------------------------------------------------------------- the equations

def accumulate(a, p, y, h):
    """One step of Eqs. (2) and (1): (a_{n-1}, p_{n-1}, y_n, h_n) -> (a_n, p_n).
    a: (B, A) or 0 for a_0; p: (B, 1) or 1 for p_0; y: (B, A) softmax; h: (B, 1) in (0, 1)."""
    a = y * p + a * (1 - p)                                              # (B, A) Eq. (2)
    return a, p * h                                                      # (B, 1) Eq. (1)


def can_halt(a, p, d):
    """Eq. (9): True where the d = N - n steps left cannot change the argmax of a_n, because the top
    class keeps at least P(c*, n)(1 - p_n)^d (Eq. 6) and the runner-up gains at most p_n d (Eq. 8).
    The paper's >= (the official code has >: they differ on exact ties only)."""
    top = a.topk(2, dim=-1).values                                       # (B, 2) P(c*, n), P(c_ru, n)
    p = p[:, 0]                                                          # (B,)
    return top[:, 0] * (1 - p) ** d >= top[:, 1] + p * d                 # (B,) bool Eq. (9)


def take(tree, idx):
    """Rows `idx` of every tensor in a (nested) dict / tuple / list, batch first: one index op each."""
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, idx)
    if isinstance(tree, dict):
        return {k: take(v, idx) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(take(v, idx) for v in tree)
    return tree


def halt_dim(inner):
    """The size D of inner.halt_input(...): `inner.halt_dim` if the model says, else `inner.cfg.dim` (MAC)."""
    dim = getattr(inner, "halt_dim", None) or getattr(getattr(inner, "cfg", None), "dim", None)
    if not dim:
        raise ValueError(f"{type(inner).__name__} must tell the size of halt_input(): set `halt_dim`")
    return dim


# ----------------------------------------------------------------------------- the wrapper

class DACT(nn.Module):
    """DACT around `inner`. forward(batch) -> log_probs (B, A) = log a_N, aux_loss = tau * mean(rho),
    steps (B,): N in training (every step runs, as in the paper), the step of Eq. (9) in eval mode."""

    def __init__(self, inner, cfg: DACTConfig):
        super().__init__()
        self.inner, self.cfg = inner, cfg
        self.max_steps = cfg.halt_max_steps or inner.max_steps
        if not 1 <= self.max_steps <= inner.max_steps:
            raise ValueError(f"--halt-max-steps {self.max_steps}, but the inner model has {inner.max_steps} steps: "
                             f"build it with (MAC) --max-steps {self.max_steps}, whose position-aware projections "
                             "are one per step")
        # official code: the halting unit is MAC's memory-gate layer, a Linear on the new control c_n,
        # Xavier weight, bias 0 (MEMORY_GATE_BIAS 0.0 in the DACT configs)
        self.halting_unit = nn.Linear(halt_dim(inner), 1)
        nn.init.xavier_uniform_(self.halting_unit.weight)
        nn.init.zeros_(self.halting_unit.bias)

    def answer(self, ctx, state):
        """Sec. 3: the step's own answer y_n, a softmax, so 0 <= y_n <= 1 (what Eq. 9 relies on)."""
        return self.inner.classify(ctx, state).float().softmax(dim=-1)  # (b, A) y_n

    def halting(self, ctx, state):
        """Sec. 3: the halting value h_n in [0, 1], the step's uncertainty about its answer."""
        # official code: h_n = 1 - sigmoid(W c_n + b), "to remain consistent with the MAC gate"
        return 1 - torch.sigmoid(self.halting_unit(self.inner.halt_input(ctx, state)).float())  # (b, 1) h_n

    def forward(self, batch):
        ctx = self.inner.encode(batch)
        state = self.inner.init_state(ctx)
        return self.all_steps(ctx, state) if self.training else self.halting_steps(ctx, state)

    def all_steps(self, ctx, state):
        """Training: all N steps, no halting, so that every step gets its gradient (Sec. 3.2)."""
        a, p, rho = 0.0, 1.0, 0.0                                        # a_0 = 0, p_0 = 1
        for n in range(1, self.max_steps + 1):
            state = self.inner.step(ctx, state, n - 1)
            a, p = accumulate(a, p, self.answer(ctx, state), self.halting(ctx, state))  # Eqs. (1), (2)
            rho = rho + p                                                # (B, 1) Eq. (3)
        # official code: L = NLL on log(a_N clamped at 1e-8), which train.py adds to aux_loss.
        # NOTE (deviation): the official code adds a constant 1 to rho; it changes no gradient: left out
        return {"log_probs": a.clamp(min=1e-8).log(),                    # (B, A) log a_N
                "aux_loss": self.cfg.tau * rho.mean(),                   # Eq. (4): L + tau * rho, batch mean
                "steps": a.new_full((len(a),), self.max_steps)}

    def halting_steps(self, ctx, state):
        """Inference: stop each example at the first step n where Eq. (9) holds.
        compact: the halted rows leave ctx and state (one index op per tensor) and are never computed
        again. mask (official code): the whole batch runs every step; a halted row gets p := 0, which
        freezes its a_n (Eq. 2); the loop ends once every row has halted. The two give the same
        predictions in exact arithmetic; their log-probabilities may differ by float rounding (about
        1e-7: rows computed in batches of other sizes), so a near-tie can flip."""
        N, compact = self.max_steps, self.cfg.halt == "compact"
        a, p, rho = 0.0, 1.0, 0.0
        for n in range(1, N + 1):
            state = self.inner.step(ctx, state, n - 1)
            a, p = accumulate(a, p, self.answer(ctx, state), self.halting(ctx, state))  # Eqs. (1), (2)
            rho = rho + p                                                # (b, 1) Eq. (3)
            if n == 1:                                                   # the outputs, in the batch's order
                B = len(a)
                rows = torch.arange(B, device=a.device)                  # (b,) batch row of each running row
                out_a, out_rho = torch.empty_like(a), torch.empty_like(rho)  # (B, A), (B, 1)
                steps, done = a.new_full((B,), N), torch.zeros(B, dtype=torch.bool, device=a.device)
            halt = can_halt(a, p, N - n) | (n == N)                      # (b,) Eq. (9); d = 0 always halts
            if compact:
                if halt.any():
                    idx = rows[halt]
                    out_a[idx], out_rho[idx], steps[idx] = a[halt], rho[halt], float(n)
                    keep = (~halt).nonzero().squeeze(1)                  # (b',)
                    if len(keep) == 0:
                        break
                    rows, a, p, rho = rows[keep], a[keep], p[keep], rho[keep]
                    ctx, state = take(ctx, keep), take(state, keep)
            else:
                steps = torch.where(halt & ~done, float(n), steps)
                done = done | halt
                p = p.masked_fill(done[:, None], 0.0)                    # a_{n+1} = a_n from here on
                if done.all():
                    out_a, out_rho = a, rho
                    break
        return {"log_probs": out_a.clamp(min=1e-8).log(), "aux_loss": self.cfg.tau * out_rho.mean(), "steps": steps}

    @torch.no_grad()
    def trace(self, batch):
        """Every step of every example, no halting (for figures and tests) -> y, a: (B, N, A);
        h, p: (B, N); halt_step: (B,) the first n where Eq. (9) holds; and each `*_attn` map of the
        state (MAC: control_attn (B, N, L), read_attn (B, N, K))."""
        ctx = self.inner.encode(batch)
        state = self.inner.init_state(ctx)
        a, p, rec, N = 0.0, 1.0, defaultdict(list), self.max_steps
        for n in range(1, N + 1):
            state = self.inner.step(ctx, state, n - 1)
            y, h = self.answer(ctx, state), self.halting(ctx, state)
            a, p = accumulate(a, p, y, h)
            maps = {k: v for k, v in state.items() if k.endswith("_attn")} if isinstance(state, dict) else {}
            for k, v in dict(y=y, a=a, h=h[:, 0], p=p[:, 0], halt=can_halt(a, p, N - n) | (n == N), **maps).items():
                rec[k].append(v)
        out = {k: torch.stack(v, dim=1) for k, v in rec.items()}
        out["halt_step"] = out.pop("halt").float().argmax(dim=1) + 1      # (B,) argmax: the first True
        return out


# the authors' recipe (ceyzaguirre4/DACT-MAC README): a 12-step MAC trained 10 epochs, then everything
# fine-tuned 30 epochs with the halting unit (`--init` the MAC); the rest of the recipe is MAC's
PRESETS = {"paper": dict(epochs=30)}  # DACT paper (CLEVR experiments): "trained for another additional 30 epochs"

Config, Model = DACTConfig, DACT  # names the trainer's registry looks for


class Toy(nn.Module):
    """The smallest model with the step protocol: a GRU cell over a vector (for the smoke run)."""
    max_steps, halt_dim = 6, 8

    def __init__(self, num_answers=5):
        super().__init__()
        self.cell, self.out = nn.GRUCell(8, 8), nn.Linear(8, num_answers)

    def encode(self, batch):
        return {"x": batch["x"]}

    def init_state(self, ctx):
        return {"h": torch.zeros_like(ctx["x"])}

    def step(self, ctx, state, t):
        return {"h": self.cell(ctx["x"], state["h"])}

    def classify(self, ctx, state):
        return self.out(state["h"])

    def halt_input(self, ctx, state):
        return state["h"]


def smoke():
    torch.manual_seed(0)
    model = DACT(Toy(), DACTConfig(tau=1e-2))
    batch = {"x": torch.randn(16, 8), "answer": torch.randint(0, 5, (16,))}
    out = model.train()(batch)
    loss = nn.functional.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"]
    loss.backward()
    with torch.no_grad():
        model.halting_unit.bias.fill_(2.0)                              # h_n = 1 - sigmoid(.) small: early halts
    model.eval()
    c = model(batch)
    model.cfg = dataclasses.replace(model.cfg, halt="mask")
    m = model(batch)
    print(f"train: loss {loss.item():.3f}, steps {out['steps'][0]:.0f}; eval: steps {c['steps'].int().tolist()}")
    print(f"compact == mask: {torch.allclose(c['log_probs'], m['log_probs'], atol=1e-6)}")


if __name__ == "__main__":
    smoke()
