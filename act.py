"""ACT: Adaptive Computation Time, around any model with the step protocol.

Paper: A. Graves, "Adaptive Computation Time for Recurrent Neural Networks", 2016, arXiv:1603.08983.
Applied to MAC as in C. Eyzaguirre, A. Soto, "Differentiable Adaptive Computation Time for Visual
Reasoning", CVPR 2020, arXiv:2004.12770; official code ceyzaguirre4/DACT-MAC (its ACTWrapper).

This file holds the ACT wrapper: a halting unit on each step's halting input, steps until the
summed halting values reach 1 - eps, the remainder R on the last step, the output as the weighted sum
of the steps' outputs, and the ponder cost N + R. Halting is part of ACT's model (the output does not
depend on the steps after N(t)), so it halts in training and inference alike, and a halted example
leaves the batch (one index op per tensor) and is never computed again. NOTE (deviation): the
official code runs the whole batch until every example has halted, masking the halted ones: the
same outputs in exact arithmetic (float rounding may differ, as rows run in batches of other sizes).

    python train.py mac act --tau 1e-3                     # from scratch
    python train.py mac act --tau 1e-3 --max-steps 12 --init runs/mac12/best.pt   # as the DACT paper
    python act.py                                          # smoke run on a toy step model

The equations are tagged by name (`# ACT: ...`), in the notation of Graves' Sec. 2 (one input step t,
so the index t is left out): h_n the halting unit, N(t) the halting step, R(t) the remainder, p_n the
halting probabilities, y = sum_n p_n y_n the output, rho = N(t) + R(t) the ponder cost, and the loss
L + tau * rho.

Shapes:
    B  batch (b: the rows still running)   A  answers   D  size of halt_input (the new control c_n in MAC)
    M  maximum number of steps (n: the current step, 1-based as in the paper)
    y_n (b, A) the step's logits; h_n, p_n, R (b,); the running sum of p_n y_n (b, A)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ACTConfig:
    tau: float = 1e-3  # Graves' time penalty on the ponder cost; the DACT code's ACT grid 5e-5 .. 1e-2
    halt_eps: float = 0.01  # Sec. 2: halt once the summed h_n reach 1 - eps (official code: 1e-2)
    halt_max_steps: int = 0  # M, the most steps (0: the inner model's max_steps, i.e. MAC's --max-steps)


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


class ACT(nn.Module):
    """ACT around `inner`. forward(batch) -> log_probs (B, A) = log_softmax(sum_n p_n y_n),
    aux_loss = tau * mean(N + R), steps (B,) = N(t), ponder (B,) = N + R."""

    def __init__(self, inner, cfg: ACTConfig):
        super().__init__()
        self.inner, self.cfg = inner, cfg
        self.max_steps = cfg.halt_max_steps or inner.max_steps
        if not 1 <= self.max_steps <= inner.max_steps:
            raise ValueError(f"--halt-max-steps {self.max_steps}, but the inner model has {inner.max_steps} steps: "
                             f"build it with (MAC) --max-steps {self.max_steps}, whose position-aware projections "
                             "are one per step")
        # official code: a Linear on the new control c_n, Xavier weight, bias 0 (MEMORY_GATE_BIAS 0.0)
        self.halting_unit = nn.Linear(halt_dim(inner), 1)
        nn.init.xavier_uniform_(self.halting_unit.weight)
        nn.init.zeros_(self.halting_unit.bias)

    def forward(self, batch):
        ctx = self.inner.encode(batch)
        state = self.inner.init_state(ctx)
        M, eps = self.max_steps, self.cfg.halt_eps
        for n in range(1, M + 1):
            state = self.inner.step(ctx, state, n - 1)
            y = self.inner.classify(ctx, state).float()                  # (b, A) ACT: y_n, logits (official code)
            h = torch.sigmoid(self.halting_unit(self.inner.halt_input(ctx, state)).float())[:, 0]  # (b,) ACT: h_n
            if n == 1:                                                   # the running sums and the outputs
                B = len(y)
                rows = torch.arange(B, device=y.device)                  # (b,) batch row of each running row
                cum, acc = torch.zeros_like(h), torch.zeros_like(y)      # (b,) sum_{i<n} h_i, (b, A) sum p_i y_i
                out, steps, R = torch.zeros_like(y), torch.zeros_like(h), torch.zeros_like(h)
            halt = (cum + h >= 1 - eps) | (n == M)                       # (b,) ACT: N(t), sum h first >= 1 - eps
            r = 1 - cum                                                  # (b,) ACT: remainder R(t), if N(t) = n
            p = torch.where(halt, r, h)                                  # (b,) ACT: p_n = R(t) at N(t), else h_n
            acc = acc + p[:, None] * y                                   # (b, A) ACT: output sum_n p_n y_n
            cum = cum + h
            if halt.any():
                idx = rows[halt]
                out[idx], steps[idx], R[idx] = acc[halt], float(n), r[halt]
                keep = (~halt).nonzero().squeeze(1)                      # (b',)
                if len(keep) == 0:
                    break
                rows, cum, acc = rows[keep], cum[keep], acc[keep]
                ctx, state = take(ctx, keep), take(state, keep)
        # ponder cost rho = N(t) + R(t); N(t) is a step count, so the gradient flows through R alone.
        # NOTE (deviation): the official code counts (N - 1) + R, a constant offset (same gradient).
        ponder = steps + R                                               # (B,) ACT: ponder cost rho = N(t) + R(t)
        return {"log_probs": out.log_softmax(dim=-1), "aux_loss": self.cfg.tau * ponder.mean(),  # ACT: L + tau rho
                "steps": steps, "ponder": ponder}


Config, Model = ACTConfig, ACT  # names the trainer's registry looks for


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


if __name__ == "__main__":
    torch.manual_seed(0)
    model = ACT(Toy(), ACTConfig(tau=1e-2))
    batch = {"x": torch.randn(16, 8), "answer": torch.randint(0, 5, (16,))}
    out = model(batch)
    loss = nn.functional.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"]
    loss.backward()
    print(f"loss {loss.item():.3f}, steps {out['steps'].int().tolist()}, ponder {out['ponder'].mean():.3f}, "
          f"halting-unit grad {model.halting_unit.weight.grad.norm():.2e}")
