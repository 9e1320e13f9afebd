"""LNMN: Stack-NMN whose modules are generic cells, each node a learned softmax(alpha) mixture of
min, max, sum, product, choose_1 and choose_2, trained by alternating first-order DARTS.

Paper: V. Pahuja, J. Fu, S. Chandar, C. J. Pal, "Structure Learning for Neural Module Networks",
LANTERN workshop at EMNLP 2019, arXiv:1905.11532. Official code: vardaan123/LNMN (PyTorch).

The file follows the paper: the generic cell (Sec. 3.1: the node O, cells of 3 and 4 inputs, attention
and answer kinds), the module inventories (Table 3), the model (Sec. 3.2: Stack-NMN's input unit,
controller, stack and output unit from stack_nmn.py, Sec. 2.1-2.3 and Algorithm 1, with these cells as
its modules) and Algorithm 2's training terms (the entropy of w(t) under the lambda_w schedule, the
sparsity of softmax(alpha), and the alpha step on held-out questions). The experiments that are not in
the paper are gathered in one section at the end ("beyond the paper"). The analysis of a trained run
is a tool outside this file (`python analyze.py lnmn`):

    python train.py lnmn [--modules 9|11|14]     # weights on training batches, alphas on a held-out slice
    python train.py lnmn --cells stack           # not in the paper: Stack-NMN's modules as fixed cells
    python train.py lnmn --compare pooled        # not in the paper: 4-input answer cells = Stack-NMN's Compare
    python train.py lnmn --entropy-scale paper --alpha-init-std 1 --weight-init lnmn_code \
        --lambda-w-curve code                    # the paper's entropy term, the official inits and curve
    python analyze.py lnmn RUN [--max-batches N] [--out DIR]
        # Fig. 3 (alpha heat map), Table 6 (expressions), Table 7 (operator ablation), Table 2 (hard-max)
    python lnmn.py                               # smoke run

Shapes: as stack_nmn.py (B batch, K = H*W knowledge cells, E size of c_t, Dm memory, T steps, L stack
slots, M modules, A answers), and
    d  node channels (cfg.map_dim)   N  operators (6)   k  nodes of a cell (2 with 3 inputs, 3 with 4)
"""
import collections
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import stack_nmn
from stack_nmn import pop, push, read, write

OPS = ("min", "max", "sum", "product", "choose_1", "choose_2")                  # Sec. 3.1, in the paper's order
# Table 3: (attention 3-input, attention 4-input, answer 3-input, answer 4-input); + 1 NoOp (footnote 2)
INVENTORIES = {9: (4, 2, 1, 1), 11: (4, 2, 2, 2), 14: (5, 4, 2, 2)}


@dataclass
class LNMNConfig:
    modules: Literal[9, 11, 14] = 9  # Table 3: module inventory, NoOp included
    map_dim: int = 384  # official README run: map_dim 384 (node channels d)
    dim: int = 512  # Stack-NMN: BiLSTM, dim // 2 per direction
    embed_dim: int = 300  # Stack-NMN: word embeddings
    control_over: Literal["words", "embeds"] = "words"  # official code: c_t averages the BiLSTM states
    kb_dim: int = 512  # Stack-NMN: knowledge-base channels
    pe_dim: int = 128  # Stack-NMN: 2-D positional encoding
    mem_dim: int = 512  # Stack-NMN: memory features f_mem
    out_dim: int = 512  # Stack-NMN: hidden layer of the output classifier
    max_steps: int = 5  # Table 2 / official README run: T = 5
    stack_len: int = 5  # Table 2 / official README run: L = 5
    sharpen: Literal["hard", "soft"] = "soft"  # Algorithm 1 and official code: p = softmax(sum_m w_m p_m / 0.2)
    sharpen_temp: float = 0.2  # official code: temperature 0.2
    output_dropout: float = 0.15  # Stack-NMN: output unit dropout
    entropy_weight: float = 1e-2  # official code reg_coeff: the weight of entropy_scale mean and batch_sum
    # NOTE (deviation): the w(t) entropy term is -lambda_w x scale x H, H = 1/T sum_t H(w_b(t)) of example b:
    #   "mean"       entropy_weight x the batch mean of H (this code);
    #   "batch_sum"  entropy_weight x the batch sum of H (official train.py: CE_mean - coeff 1e-2 imp_loss.sum());
    #   "paper"      the batch mean of H, no weight (Algorithm 2: lambda_w / T sum_t H per example, as the CE)
    entropy_scale: Literal["mean", "batch_sum", "paper"] = "mean"  # mean: this code; batch_sum: official; paper: Algorithm 2
    entropy_switch: float = 2 / 3  # Sec. 3.2: lambda_w 1 -> 0 over 20 epochs, then -> -1 over the next 10
    # "paper": Sec. 3.2's straight lines (entropy_switch); "code": official train.py's get_entropy_coeff,
    # 1 -> 0.22 at epoch 19 -> 0 near 20.8 -> -1 at 29, its epochs laid over the run as LNMN.lambda_w says
    lambda_w_curve: Literal["paper", "code"] = "paper"  # paper: Sec. 3.2's lines; code: the official curve
    op_weight: float = 1.0  # Sec. 4: lambda_op of the l2/l1 sparsity term on softmax(alpha)
    arch_lr: float = 3e-4  # Sec. 4: Adam for alpha
    arch_wd: float = 1e-3  # Sec. 4: weight decay for alpha, betas (0.5, 0.999)
    held_out: float = 0.1  # NOTE (deviation): share of the TRAINING questions for the alpha steps (official: val)
    held_out_seed: int = 0  # which training questions are held out
    # Sec. 2.2, 3.1 and official code: a 3-input attention cell pops the map it reads and pushes its output, so
    # the pointer stays and the output replaces that map. NOTE (deviation, --push-fix): read without popping,
    # then push, so a second Find leaves the first object's map under it (RESULTS.md, "LNMN": not better)
    push_fix: bool = False  # Sec. 2.2: pop then push; --push-fix: this code's read-then-push (not in the paper)
    norm_fix: bool = True  # NOTE (deviation): 4-input cells merge their maps without the L2 norm (official: sign)
    node_norm: bool = True  # NOTE (deviation from Sec. 3.1's O, which has no norm): official code, L2 over channels
    alpha_init_std: float = 1e-3  # NOTE (deviation): alpha ~ N(0, std^2), 1e-3 as DARTS; official cell.py: N(0, 1)
    # NOTE (deviation): "tf", Stack-NMN's TF init (stack_nmn.tf_init); "lnmn_code", the official LNMN code's
    # (model.py, cell.py reset_params): Xavier-normal linears, zero biases; Xavier-uniform 1x1 convs, biases
    # N(0, 1); Xavier-normal LSTM weights, zero biases; c_0 ~ N(0, 1) (lnmn_code_init)
    weight_init: Literal["tf", "lnmn_code"] = "tf"  # tf: Stack-NMN's TF init; lnmn_code: the official LNMN code's
    cells: Literal["learned", "stack"] = "learned"  # NOTE (not in the paper): "stack" fixes the cells to STACK_CELLS
    arch_warmup: float = 0.0  # NOTE (not in the paper): share of the run before the first alpha step (DARTS-style)
    compare: Literal["cell", "pooled"] = "cell"  # NOTE (not in the paper): "pooled": Ans4 cells = Stack-NMN's Compare


# A CPU run on the built-in mini-CLEVR (not from the paper): the node as the paper writes it (no per-node
# L2 norm) and the alphas stepped at the paper's 3e-4. Its accuracy and time, and those of the settings
# it was chosen over, are in RESULTS.md, "LNMN". Keys that are not Config fields set the training recipe
# (train.Recipe) or the trainer.
PRESETS = {
    # the paper's training recipe (Sec. 4), and its official code's (vardaan123/LNMN) where the paper says nothing
    "paper": dict(lr=1e-4,  # Sec. 4: Adam 1e-4 for the weights
                  batch_size=64, clip=0.0,  # official code: batch 64, no gradient clipping
                  epochs=30,  # Sec. 4: lambda_w 1 -> 0 over 20 epochs, then -> -1 over the next 10
                  ema=0.999,  # not stated: the paper names no moving average, so the trainer's EMA is kept
                  schedule="constant"),  # not stated: the paper names no schedule, so a constant rate
    "laptop": dict(map_dim=64, dim=128, embed_dim=64, kb_dim=64, pe_dim=16, mem_dim=128, out_dim=128,
                   output_dropout=0.0, node_norm=False, lr=1e-3, schedule="cosine", batch_size=128, epochs=10,
                   threads=2,
                   clip=8.0, ema=0.999),  # not the paper's clipping: the values its measured runs used
}


# ----------------------------------------------------------------------------- the generic cell (Sec. 3.1)

def op_weights(alpha, mask=None, hard=False):
    """alpha' = softmax(alpha) (..., N), or its argmax one-hot (Table 2); `mask` (N,) zeroes operators (Table 7)."""
    w = F.one_hot(alpha.argmax(-1), len(OPS)).to(alpha.dtype) if hard else alpha.softmax(-1)
    return w if mask is None else w * mask


def node_reference(w, x1, x2, normalize=True):
    """The node as Sec. 3.1 writes it: O(x1, x2) = sum_i alpha'_i op_i(x1, x2), w = alpha' (N,) over OPS,
    then L2-normalised over channels (official code) unless normalize=False. `node` computes the same,
    rearranged for speed; tests/test_lnmn.py checks that the two agree in values and gradients."""
    x1, x2 = torch.broadcast_tensors(x1, x2)                             # (B, K, d) each
    ops = (torch.minimum(x1, x2), torch.maximum(x1, x2), x1 + x2, x1 * x2, x1, x2)  # in OPS order
    out = sum(w_i * op for w_i, op in zip(w, ops))                       # (B, K, d) Sec. 3.1: O(x1, x2)
    return F.normalize(out, dim=-1) if normalize else out


def node_terms(w):
    """The six-op sum gathered in four terms: sum_i w_i op_i(x1, x2) = b1 x1 + b2 x2 + w_prod x1 x2
    + k |x1 - x2|, since min and max are (x1 + x2 -+ |x1 - x2|) / 2. w (N, ...) over OPS -> b1, b2, w_prod, k."""
    w_min, w_max, w_sum, w_prod, w_1, w_2 = w
    s = (w_min + w_max) / 2 + w_sum                                      # the weight of x1 + x2
    return s + w_1, s + w_2, w_prod, (w_max - w_min) / 2


def node(w, x1, x2, normalize=True, dist=None):
    """`node_reference` rearranged: x1, x2 broadcast to (B, K, d); w (N,) over OPS; `dist` |x1 - x2| if the
    caller has it. By `node_terms`, O = x1 (b1 + w_prod x2) + b2 x2 + k |x1 - x2|: two fused passes over
    (B, K, d) and one for |x1 - x2|, instead of one per op. min and max written with |x1 - x2| have the same
    values and gradients (ties included: each input gets half, as torch.minimum / torch.maximum give), and
    their backward on broadcast inputs is slow (RESULTS.md, "Speed of a node")."""
    b1, b2, b12, k = node_terms(w)
    dist = (x1 - x2).abs() if dist is None else dist                     # (B, K, d)
    if x1.numel() < x2.numel():                                          # one pass over the larger input
        x1, x2, b1, b2 = x2, x1, b2, b1
    # Sec. 3.1: O(x1, x2) = w_min min(x1, x2) + w_max max(x1, x2) + w_sum (x1 + x2) + w_prod x1 x2 + w_1 x1 + w_2 x2
    out = torch.addcmul(torch.addcmul(b2 * x2, x1, b1 + b12 * x2), dist, k)  # (B, K, d)
    return F.normalize(out, dim=-1) if normalize else out


class Cell(nn.Module):
    """A generic module. kind: "attn" (output: a 1-channel map) or "ans" (output: memory features);
    inputs 3 (I, a, c: nodes O1(conv1(I), a), O2(O1, W1 c)) or 4 (I, a1, a2, c: nodes O1(a1, a2),
    O2(O1, conv1(I)), O3(O2, W1 c)). Its own parameters: alpha (k, N) and conv2 (attn) or W2 (ans);
    conv1 and W1 are shared by all cells (official code). `forward` computes it node by node as Sec. 3.1
    writes it; `fast`, which the model runs, gives the same values and gradients in fewer passes over
    (B, K, d) tensors (tests/test_lnmn.py checks the two against each other)."""

    def __init__(self, kind, inputs, cfg):
        super().__init__()
        self.kind, self.inputs, self.norm = kind, inputs, cfg.node_norm
        self.pooled = kind == "ans" and inputs == 4 and cfg.compare == "pooled"  # beyond the paper: pooled_compare
        self.merge_norm = cfg.node_norm and not cfg.norm_fix
        # alpha ~ N(0, alpha_init_std^2): 1e-3 as DARTS by default, the official code's N(0, 1) with 1.0
        self.alpha = nn.Parameter(cfg.alpha_init_std * torch.randn(inputs - 1, len(OPS)), requires_grad=not self.pooled)
        d = cfg.map_dim
        self.out = nn.Linear(d, 1) if kind == "attn" else nn.Linear(d + d + cfg.mem_dim, cfg.mem_dim)

    def forward(self, I, maps, c, m, mask=None, hard=False):
        """I (B, K, d) conv1(I); maps [(B, K)] 1 or 2 attention maps (logits); c (B, d) W1 c;
        m (B, Dm) f_mem -> attention map (B, K) or memory (B, Dm)."""
        if self.pooled:
            return pooled_compare(self, I, maps, c, m)                   # (B, Dm) beyond the paper
        w = op_weights(self.alpha, mask, hard)                           # (k, N)
        maps = [a[..., None] for a in maps]                              # (B, K, 1): broadcast over channels
        if self.inputs == 3:
            x = node(w[0], I, maps[0], self.norm)                        # (B, K, d) Sec. 3.1.1: O1(conv1(I), a)
        else:  # the two maps merged: (B, K, 1); the official code's L2 norm makes it sign(x) (norm_fix)
            x = node(w[0], maps[0], maps[1], self.merge_norm)            # (B, K, 1) Sec. 3.1.2: O1(a1, a2)
            x = node(w[1], x, I, self.norm)                              # (B, K, d) Sec. 3.1.2: O2(O1, conv1(I))
        x = node(w[-1], x, c[:, None], self.norm)                        # (B, K, d) Sec. 3.1: the last node, (., W1 c)
        return self.output(x, c, m)

    def output(self, x, c, m):
        """x (B, K, d) the last node's output -> attention map (B, K) or memory (B, Dm)."""
        if self.kind == "ans":
            return self.out(torch.cat([x.sum(1), c, m], -1))             # (B, Dm) Sec. 3.1: W2[sum x; W1 c; f_mem]
        return self.out(x).squeeze(-1)                                   # (B, K) Sec. 3.1: conv2, 1x1 to one channel

    def fast(self, I, maps, c, m, mask=None, hard=False, dist=None):
        """`forward` in fewer passes over (B, K, d) tensors: `dist` |conv1(I) - a| is computed once for all
        the 3-input cells (CellModules), and without the node norm the last node is folded into the output
        layer (`last_node_output`), so its (B, K, d) output is never formed. Same arguments and result."""
        if self.pooled:
            return pooled_compare(self, I, maps, c, m)                   # (B, Dm) beyond the paper
        w = op_weights(self.alpha, mask, hard)                           # (k, N)
        maps = [a[..., None] for a in maps]                              # (B, K, 1)
        if self.inputs == 3:
            x = node(w[0], I, maps[0], self.norm, dist)                  # (B, K, d) O1(conv1(I), a)
        else:
            x = node(w[0], maps[0], maps[1], self.merge_norm)            # (B, K, 1) O1(a1, a2)
            x = node(w[1], x, I, self.norm)                              # (B, K, d) O2(O1, conv1(I))
        if self.norm:                                                    # the L2 norm is not linear: as forward
            return self.output(node(w[-1], x, c[:, None], True), c, m)
        return self.last_node_output(w[-1], x, c, m)

    def last_node_output(self, w, x, c, m):
        """output(O(x, c)) without forming O: by `node_terms`, O = x g + h + k |x - c| with g = b1 + w_prod c
        and h = b2 c constant over the positions, and conv2 (per position) and W2[sum over positions; ...]
        are linear, so they take the three terms apart: conv2 as dot products with its weight v, W2 on
        sum_k O = g sum_k x + K h + k sum_k |x - c|. x (B, K, d), c (B, d), m (B, Dm)."""
        b1, b2, b12, k = node_terms(w)
        g, h = b1 + b12 * c, b2 * c                                      # (B, d) each
        dist = (x - c[:, None]).abs()                                    # (B, K, d) |x - W1 c|
        if self.kind == "ans":
            pooled = g * x.sum(1) + x.size(1) * h + k * dist.sum(1)     # (B, d) sum_k O(x, W1 c)
            return self.out(torch.cat([pooled, c, m], -1))               # (B, Dm) W2[sum O; W1 c; f_mem]
        v = self.out.weight[0]                                           # (d,) conv2
        return (x @ (g * v)[..., None]).squeeze(-1) + (h @ v)[:, None] + k * (dist @ v) + self.out.bias  # (B, K)

    def expression(self, hard_alpha=None):
        """The analytical expression from the argmax op of every node (Table 6), choose_* resolved."""
        if self.pooled:
            return POOLED_EXPRESSION
        idx = (self.alpha if hard_alpha is None else hard_alpha).argmax(-1).tolist()
        terms = ("conv1(I)", "a") if self.inputs == 3 else ("a1", "a2")
        x = show(idx[0], *terms)
        if self.inputs == 4:
            x = show(idx[1], x, "conv1(I)")
        x = show(idx[-1], x, "W1 c")
        return f"conv2({x})" if self.kind == "attn" else f"W2[sum({x}), W1 c, f_mem]"


def show(op, x, y):
    """One node as text: min(x, y), max(x, y), x + y, x * y (sums parenthesised), x, y."""
    return (f"min({x}, {y})", f"max({x}, {y})", f"{x} + {y}", f"{par(x)} * {par(y)}", x, y)[op]


def par(s):
    """s in parentheses if it is a sum at its top level."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch in "([") - (ch in ")]")
        if depth == 0 and s.startswith(" + ", i):
            return f"({s})"
    return s


# ----------------------------------------------------------------------------- the model (Sec. 3.2)

class CellModules(nn.Module):
    """NoOp + the cells of Table 3. Stack use (Sec. 2.2), in `forward`: attention 3-input reads the top map
    and, by the rule of `push_fix`, either replaces the map it read (the paper's pop-then-push: the pointer
    stays) or pushes its output on top of it (--push-fix), attention 4-input pops two and pushes one, answer
    cells pop the one or two maps they read (official code; Stack-NMN's describe modules keep the stack).
    Only answer cells output memory: f_mem = sum_{m in ans} w_m o_m (Sec. 2.3), so NoOp, unlike
    Stack-NMN's, does not carry it over."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Linear(cfg.kb_dim, cfg.map_dim)                  # shared conv1x1 on the knowledge base
        self.w1 = nn.Linear(stack_nmn.control_dim(cfg), cfg.map_dim)    # shared W1 c
        counts = INVENTORIES[cfg.modules]
        kinds = [("attn", 3), ("attn", 4), ("ans", 3), ("ans", 4)]
        self.cells = nn.ModuleList(Cell(k, n, cfg) for (k, n), c in zip(kinds, counts) for _ in range(c))
        self.names = ["NoOp"] + [f"{'Attn' if c.kind == 'attn' else 'Ans'}{c.inputs}_{i}" for i, c in enumerate(self.cells)]
        if cfg.cells == "stack":
            fix_stack_cells(self.cells)                                  # beyond the paper
        self.op_mask, self.hard = None, False                            # set by the analysis (Tables 7, 2)
        self.reference = False                                           # True: every cell by Cell.forward (tests)

    def run_cells(self, I, a1, a2, c, m):
        """Every cell's output, in order: I (B, K, d) conv1(I), a1 (B, K) the map under the top, a2 (B, K) the
        top map, c (B, d) W1 c, m (B, Dm) f_mem -> [(B, K) or (B, Dm)]."""
        if self.reference:
            return [cell(I, [a2] if cell.inputs == 3 else [a1, a2], c, m, self.op_mask, self.hard)
                    for cell in self.cells]
        dist = (I - a2[..., None]).abs()                                 # (B, K, d) node 1 of every 3-input cell
        return [cell.fast(I, [a2], c, m, self.op_mask, self.hard, dist) if cell.inputs == 3
                else cell.fast(I, [a1, a2], c, m, self.op_mask, self.hard) for cell in self.cells]

    def forward(self, kb, A, p, m, c):
        """-> stacks (B, K, L, M), pointers (B, L, M), memories (B, Dm, M), NoOp first, then the cells."""
        a2, p_pop = read(A, p), pop(p)
        a1 = read(A, p_pop)                                              # the map under the top
        ys = self.run_cells(self.conv1(kb), a1, a2, self.w1(c), m)       # conv1(I) (B, K, d), W1 c (B, d)
        zero = torch.zeros_like(m)
        out = [(A, p, zero)]                                             # NoOp: f_mem from answer cells only
        for cell, y in zip(self.cells, ys):
            if cell.kind == "ans":                                       # Sec. 2.2: pops what it read
                out.append((A, p_pop if cell.inputs == 3 else pop(p_pop), y))
            elif cell.inputs == 3:  # Sec. 2.2: pop, push (written where it read); push_fix: read, push
                q = push(p) if self.cfg.push_fix else p
                out.append((write(A, q, y), q, zero))
            else:                                                        # Sec. 2.2: pops 2, pushes 1
                out.append((write(A, p_pop, y), p_pop, zero))
        return tuple(torch.stack(z, -1) for z in zip(*out))


class LNMN(stack_nmn.StackNMN):
    """Sec. 3.2: Stack-NMN (its input unit, controller, stack with soft execution and output unit) with
    CellModules as its modules. forward -> log_probs (B, A), aux_loss = -lambda_w x scale x H(w(t)) for
    the weights (entropy_term), arch_loss = -lambda_op sum_{m,k} ||softmax(alpha)||_2 / ||softmax(alpha)||_1
    for the alphas (Algorithm 2); the trainer takes the alpha step through `arch_step`."""

    def __init__(self, cfg, info):
        super().__init__(cfg, info)                                      # Stack-NMN's TF init (weight_init tf)
        if cfg.weight_init == "lnmn_code":
            lnmn_code_init(self)

    def build_modules(self, cfg):
        bank = CellModules(cfg)
        self.module_names = bank.names
        return bank

    def forward(self, batch):
        warm_up_alphas(self)                                             # --arch-warmup, beyond the paper
        ctx, states = self.run(batch)
        w = torch.stack([s["module_logits"] for s in states], 1).softmax(-1)  # (B, T, M) w(t)
        return {"log_probs": self.classify(ctx, states[-1]).log_softmax(-1),
                "aux_loss": self.entropy_term(w), "arch_loss": self.sparsity_term()}

    def regularizer(self):
        """No weight decay on the weights (Sec. 4), so Stack-NMN's regularizer is not inherited."""
        return 0.0

    # ---- Algorithm 2: step 1 (the weights, by the trainer) and step 2 (the alphas, arch_step)

    def lambda_w(self):
        """lambda_w at this point of the run (progress p in [0, 1]). "paper" (Sec. 3.2, Fig. 5): 1 -> 0 over
        the first entropy_switch s of the run, then 0 -> -1. "code" (official train.py, get_entropy_coeff of
        the epoch e of 30): 1 - 2e / 49 up to e = 19 (11/49 = 0.22), then 11/49 - 6 (e - 19) / 49, 0 at
        e = 20.83 and -1 at e = 29; here e is laid over the run as the paper's 20 + 10 epochs are (e = 20 p / s
        up to s, then 20 + 10 (p - s) / (1 - s): e = 30 p at s = 2/3), continuous in e where the code steps
        once an epoch, and held at -1 from e = 29 on (the code has no epoch 30)."""
        s, p = self.cfg.entropy_switch, self.progress
        if self.cfg.lambda_w_curve == "paper":
            return 1 - p / s if p < s else -(p - s) / max(1 - s, 1e-9)
        e = 20 * p / s if p < s else 20 + 10 * (p - s) / max(1 - s, 1e-9)   # the official code's epoch
        return 1 - 2 * e / 49 if e <= 19 else max(11 / 49 - 6 * (e - 19) / 49, -1.0)

    def entropy_term(self, w):
        """Algorithm 2, step 1: -lambda_w / T sum_t H(w(t)), scaled by entropy_scale (see LNMNConfig); w (B, T, M)."""
        h = -(w * w.clamp(min=1e-8).log()).sum(-1)                      # (B, T) H(w_b(t))
        if self.cfg.entropy_scale == "paper":                            # the batch mean of 1/T sum_t H, no weight
            return -self.lambda_w() * h.mean()
        entropy = h.mean() if self.cfg.entropy_scale == "mean" else h.mean(1).sum()  # batch mean or sum of H
        return -self.lambda_w() * self.cfg.entropy_weight * entropy

    def sparsity_term(self):
        """Algorithm 2, step 2: -lambda_op sum_{m,k} ||softmax(alpha^{m,k})||_2 / ||softmax(alpha^{m,k})||_1."""
        alphas = torch.cat(self.arch_parameters()).softmax(-1)           # (nodes, N)
        sparsity = (alphas.norm(dim=-1) / alphas.sum(-1)).sum()
        return -self.cfg.op_weight * sparsity

    def arch_parameters(self):
        return [c.alpha for c in self.modules_.cells if not c.pooled]  # a pooled cell's alphas are unused

    def arch_optimizer(self):
        """Sec. 4: Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3, on the alphas alone."""
        if self.cfg.cells == "stack":  # beyond the paper: the alphas are fixed, no alpha step (the trainer skips None)
            return None
        return torch.optim.Adam(self.arch_parameters(), lr=self.cfg.arch_lr, betas=(0.5, 0.999),
                                weight_decay=self.cfg.arch_wd)

    def arch_step(self, forward, batch, optimizer, autocast):
        """Algorithm 2, step 2 (first-order DARTS): one step of `optimizer` on the NLL of a held-out batch
        plus the sparsity term. `forward` is the model as the trainer runs it (compiled, in DDP), so that
        the alpha gradients are averaged over the processes. The other parameters are frozen for the step:
        the trainer discards their gradients (the next weight step starts from none), so the backward skips
        them and every branch that leads to them alone (the question encoder, conv1(I)): the same alpha step,
        in fewer passes."""
        alphas = {id(a) for a in self.arch_parameters()}
        frozen = [p for p in self.parameters() if p.requires_grad and id(p) not in alphas]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with autocast:
                out = forward(batch)
                loss = F.nll_loss(out["log_probs"].float(), batch["answer"], ignore_index=-100) + out["arch_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def train_subset(self, n):
        """The training rows for the weights; the rest (held_out) are the alpha steps' batches."""
        order = np.random.default_rng(self.cfg.held_out_seed).permutation(n)
        return np.sort(order[int(round(self.cfg.held_out * n)):])


def lnmn_code_init(model):
    """--weight-init lnmn_code, the official LNMN code's reset_params (model.py, cell.py): Xavier-normal
    weights and zero biases for the linears; Xavier-uniform weights and N(0, 1) biases for its 1x1 convs,
    which are the knowledge base's two convs, conv1 and the attention cells' conv2 (nn.Linear here);
    Xavier-normal LSTM weights, zero LSTM biases; c_0 ~ N(0, 1). The word embeddings keep N(0, 1), as
    there; the alphas are alpha_init_std's."""
    convs = {model.modules_.conv1, *(cell.out for cell in model.modules_.cells if cell.kind == "attn")}
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or m in convs:
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LSTM):
            for name, p in m.named_parameters():
                (nn.init.zeros_ if "bias" in name else nn.init.xavier_normal_)(p)
    nn.init.normal_(model.controller.c_0)


Config, Model = LNMNConfig, LNMN  # names the trainer's registry looks for


# ---- beyond the paper ----
# Three experiments of this codebase, none of them in the paper: --cells stack (Stack-NMN's modules
# written as cells, their alphas fixed: the reference the search is measured against), --compare pooled
# (the 4-input answer cell as Stack-NMN's Compare) and --arch-warmup (the weights alone for a share of
# the run before the first alpha step, as DARTS-style warm-ups).

# Stack-NMN's modules written as cells, the ops of each node; an inventory's cells of one kind take
# these in turn. The 1x1 cells cannot move a map across positions, so Transform has no cell.
STACK_CELLS = {
    ("attn", 3): [("choose_1", "product"),             # Find:   conv2(conv1(I) * W1 c)
                  ("product", "product"),              # Filter: conv2(conv1(I) * a * W1 c) (Find, softly And-ed)
                  ("choose_1", "choose_1"),            # Scene:  conv2(conv1(I))
                  ("sum", "product")],                 #         conv2((conv1(I) + a) * W1 c): Find on an empty stack
    ("attn", 4): [("min", "choose_1", "choose_1"),     # And:    conv2(min(a1, a2))
                  ("max", "choose_1", "choose_1")],    # Or:     conv2(max(a1, a2))
    ("ans", 3): [("product", "product"),               # Answer: W2[sum(conv1(I) * a * W1 c), W1 c, f_mem]
                 ("choose_2", "choose_1")],            #         W2[sum(a), W1 c, f_mem] (a count)
    ("ans", 4): [("sum", "product", "product"),        # Compare: W2[sum((a1 + a2) * conv1(I) * W1 c), ...]
                 ("max", "product", "product")],
}


def fix_stack_cells(cells):
    """--cells stack: every cell's alphas set to 20 * one-hot of its STACK_CELLS ops (softmax(20 one-hot)
    = one-hot to 1e-8) and frozen, so LNMN.arch_optimizer has no alpha step to take."""
    turn = collections.Counter()                                         # cells of one kind take STACK_CELLS in turn
    for cell in cells:
        kind = (cell.kind, cell.inputs)
        ops = STACK_CELLS[kind][turn[kind] % len(STACK_CELLS[kind])]
        turn[kind] += 1
        cell.alpha.data = 20 * F.one_hot(torch.tensor([OPS.index(o) for o in ops]), len(OPS)).float()
        cell.alpha.requires_grad_(False)


POOLED_EXPRESSION = "W2[l2norm(sum(softmax(a1) conv1(I)) * sum(softmax(a2) conv1(I)) * W1 c), W1 c, f_mem]"


def pooled_compare(cell, I, maps, c, m):
    """--compare pooled: a 4-input answer cell computed as Stack-NMN's Compare: each map pools the image
    on its own, the two pooled features multiply. The cell's alphas are unused (and frozen).
    I (B, K, d), maps [(B, K)] * 2, c (B, d), m (B, Dm) -> (B, Dm)."""
    x1, x2 = [(a.softmax(-1)[..., None] * I).sum(1) for a in maps]       # (B, d) each
    return cell.out(torch.cat([F.normalize(x1 * x2 * c, dim=-1), c, m], -1))  # (B, Dm)


def warm_up_alphas(model):
    """--arch-warmup: while training, before that share of the run no alpha requires a gradient, and the
    trainer skips the alpha step while none does. A no-op without the flag or with --cells stack."""
    if model.training and model.cfg.cells == "learned" and model.cfg.arch_warmup:
        for alpha in model.arch_parameters():
            alpha.requires_grad_(model.progress >= model.cfg.arch_warmup)


def smoke():
    torch.manual_seed(0)
    info = dict(num_words=20, num_answers=7, image_kind="features", image_shape=(18, 6, 6))
    model = LNMN(LNMNConfig(map_dim=16, dim=32, embed_dim=16, kb_dim=16, pe_dim=8, mem_dim=16, out_dim=16), info)
    lens = torch.tensor([9, 5, 3, 7])
    batch = dict(image=torch.rand(4, 18, 6, 6), question=torch.randint(4, 20, (4, 9)) * (torch.arange(9) < lens[:, None]),
                 question_len=lens, answer=torch.randint(0, 7, (4,)))
    out = model(batch)
    loss = F.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"] + out["arch_loss"]
    loss.backward()
    print(f"modules {model.module_names}\nlog_probs {tuple(out['log_probs'].shape)}  loss {loss.item():.3f}  "
          f"params {sum(p.numel() for p in model.parameters()):,}")


if __name__ == "__main__":
    smoke()
