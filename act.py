"""ACT: Adaptive Computation Time, around any model with the step protocol.

Paper: A. Graves, "Adaptive Computation Time for Recurrent Neural Networks", 2016, arXiv:1603.08983.
Applied to MAC as in C. Eyzaguirre, A. Soto, "Differentiable Adaptive Computation Time for Visual
Reasoning", CVPR 2020, arXiv:2004.12770; official code ceyzaguirre4/DACT-MAC (its ACTWrapper).

This file holds the ACT wrapper: a halting unit on each step's halting input, steps until the
summed halting values reach 1 - eps, the remainder R on the last step, the output as the weighted sum
of the steps' outputs, and the ponder cost N + R. Halting is part of ACT's model (the output does not
depend on the steps after N(t)), so it halts in training and inference alike, and a halted example
leaves the batch (one index op per tensor) and is never computed again. (The official code runs the
whole batch until every example has halted, masking the halted ones: the same outputs.)

    python train.py mac act --tau 1e-3                     # from scratch
    python train.py mac act --tau 1e-3 --max-steps 12 --init runs/mac12/best.pt   # as the DACT paper
    python dact.py eval --init RUN/best.pt                 # steps histogram, per family / kind

Shapes:
    B  batch (b: the rows still running)   A  answers   D  size of halt_input
    M  maximum number of steps (n: the current step, 1-based as in the paper)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from dact import Toy, halt_dim, take  # the wrappers' shared row selection, halting-unit size and toy model


@dataclass
class ACTConfig:
    tau: float = 1e-3  # time penalty on the ponder cost; DACT paper's ACT grid 5e-5 .. 1e-2 (official configs)
    halt_eps: float = 0.01  # Sec. 2: halt once the summed h_n reach 1 - eps (official code: 1e-2)
    halt_max_steps: int = 0  # M, the most steps (0: the inner model's max_steps, i.e. MAC's --max-steps)


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
            y = self.inner.classify(ctx, state).float()                  # (b, A) y_n: logits, as the official code
            h = torch.sigmoid(self.halting_unit(self.inner.halt_input(ctx, state)).float())[:, 0]  # (b,) h_n
            if n == 1:                                                   # the running sums and the outputs
                B = len(y)
                rows = torch.arange(B, device=y.device)                  # (b,) batch row of each running row
                cum, acc = torch.zeros_like(h), torch.zeros_like(y)      # (b,) sum_{i<n} h_i, (b, A) sum p_i y_i
                out, steps, R = torch.zeros_like(y), torch.zeros_like(h), torch.zeros_like(h)
            halt = (cum + h >= 1 - eps) | (n == M)                       # (b,) n = N(t): sum h first reaches 1 - eps
            r = 1 - cum                                                  # (b,) the remainder R(t) if N(t) = n
            p = torch.where(halt, r, h)                                  # (b,) p_n = R on the halting step, h_n before
            acc = acc + p[:, None] * y                                   # (b, A) output = sum_n p_n y_n
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
        ponder = steps + R                                               # (B,)
        return {"log_probs": out.log_softmax(dim=-1), "aux_loss": self.cfg.tau * ponder.mean(),
                "steps": steps, "ponder": ponder}


Config, Model = ACTConfig, ACT  # names the trainer's registry looks for


if __name__ == "__main__":
    torch.manual_seed(0)
    model = ACT(Toy(), ACTConfig(tau=1e-2))
    batch = {"x": torch.randn(16, 8), "answer": torch.randint(0, 5, (16,))}
    out = model(batch)
    loss = nn.functional.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"]
    loss.backward()
    print(f"loss {loss.item():.3f}, steps {out['steps'].int().tolist()}, ponder {out['ponder'].mean():.3f}, "
          f"halting-unit grad {model.halting_unit.weight.grad.norm():.2e}")
