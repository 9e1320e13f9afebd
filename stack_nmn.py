"""Stack-NMN: a controller picks a soft mixture of neural modules at every step; the modules pass
attention maps to each other through a differentiable stack.

Paper: R. Hu, J. Andreas, T. Darrell, K. Saenko, "Explainable Neural Computation via Stack Neural
Module Networks", ECCV 2018, arXiv:1807.08556. Official code: ronghanghu/snmn (TensorFlow).

The file follows the paper's Sec. 3: the input unit (BiLSTM question encoder; knowledge base over the
image features with a 2-D positional encoding), the layout controller (Sec. 3.1: textual parameter c_t
and module weights w(t)), the differentiable stack and the nine modules (Sec. 3.2), soft execution
(Sec. 3.3: every module runs, their stacks, pointers and memories averaged with w(t), the pointer
sharpened), the model with the output unit and the step protocol of DESIGN.md (so
`python train.py stack_nmn dact` works), and the training terms (Sec. 3.4): the expert layout derived
from a CLEVR program (`--layout gt`), the entropy of w(t) ramped in late (`--layout scratch`) and the
weight decay (`regularizer`, added by the trainer to the training loss).

    python train.py stack_nmn --layout gt            # supervised by the expert layout (layout loss)
    python train.py stack_nmn --layout scratch       # from scratch, entropy sharpening ramped in late
    python analyze.py stack-figure RUN [--index 0] [--out fig.png]   # w(t) and attention per step
    python stack_nmn.py                              # smoke run

Shapes:
    B  batch      S  question tokens     K = H*W knowledge cells (14*14 on CLEVR, 6*6 built-in)
    D  BiLSTM size (cfg.dim)   E  size of c_t (the word embedding's; D with control_over words)
    Dk  knowledge base   Dm  memory
    T  controller steps   L  stack slots   M  modules (9)   A  answers
"""
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import data


@dataclass
class StackNMNConfig:
    layout: Literal["scratch", "gt"] = "scratch"  # Sec. 4: layouts learned from scratch, or supervised by the expert layout
    dim: int = 512  # official config LSTM_DIM: BiLSTM, dim // 2 per direction
    embed_dim: int = 300  # official config EMBED_DIM: word embeddings
    control_over: Literal["embeds", "words"] = "embeds"  # official USE_WORD_EMBED: c_t averages embeddings
    kb_dim: int = 512  # official config KB_DIM: knowledge-base channels
    pe_dim: int = 128  # official config PE_DIM: 2-D positional encoding appended to the features
    mem_dim: int = 512  # official config NMN.MEM_DIM: memory vector of the describe modules
    out_dim: int = 512  # official config VQA_OUTPUT_DIM: hidden layer of the output classifier
    max_steps: int = 9  # Sec. 4 / official config T_CTRL: T controller steps
    stack_len: int = 8  # official vqa_*.yaml STACK.LENGTH: L slots
    sharpen: Literal["hard", "soft"] = "hard"  # official USE_HARD_SHARPEN: argmax pointer, or softmax(p / temp)
    sharpen_temp: float = 0.2  # official SOFT_SHARPEN_TEMP
    output_dropout: float = 0.15  # official DROPOUT_KEEP_PROB 0.85 in the output unit
    layout_weight: float = 1.0  # official LAYOUT_LOSS_WEIGHT: CE of w(t) against the expert layout (--layout gt)
    entropy_weight: float = 0.1  # official vqa_scratch.yaml SHARPEN_LOSS_WEIGHT: entropy of w(t) (--layout scratch)
    entropy_begin: float = 0.75  # official vqa_scratch.yaml: the ramp 0 -> 1 starts at iteration 150K of 200K
    entropy_end: float = 0.8  # ... and ends at 160K of 200K (fractions of the run)
    prune_filters: bool = True  # official data_reader.py prune_filter_module (on): a Filter right after a Find or Filter is dropped (--layout gt)
    weight_decay: float = 1e-5  # official WEIGHT_DECAY: + wd * sum ||W||^2 / 2 over weight matrices (regularizer())


# A CPU run on the built-in mini-CLEVR (not from the paper; its accuracy and time are in RESULTS.md,
# "Stack-NMN"). Keys that are not Config fields set the training recipe (train.Recipe) or the trainer.
PRESETS = {
    # the official training recipe (ronghanghu/snmn, models_clevr_snmn/config.py, exp_clevr_snmn/train_net_vqa.py)
    "paper": dict(lr=1e-4, batch_size=64,  # TRAIN.SOLVER.LR, TRAIN.BATCH_SIZE: Adam
                  epochs=18,  # cfgs/vqa_*.yaml TRAIN.MAX_ITER 200000 x 64 questions: 18.3 epochs of CLEVR's 700K
                  clip=0.0,  # solver.minimize: no gradient clipping
                  ema=0.999,  # TRAIN.EMV_DECAY, the moving average used at test (TEST.USE_EMV)
                  schedule="constant"),  # a constant learning rate
    "laptop": dict(dim=128, embed_dim=64, kb_dim=64, pe_dim=16, mem_dim=128, out_dim=128, output_dropout=0.0,
                   lr=1e-3, schedule="cosine", batch_size=128, epochs=14, threads=2,
                   clip=8.0, ema=0.999,  # not the official recipe's clipping: the values its measured runs used
                   prune_filters=False),  # the unpruned layouts its --layout gt runs were measured with (RESULTS.md)
}

MODULES = ("NoOp", "Find", "Transform", "Filter", "And", "Or", "Scene", "Answer", "Compare")
NOOP, FIND, TRANSFORM, FILTER, AND, OR, SCENE, ANSWER, COMPARE = range(9)


# ----------------------------------------------------------------------------- input unit

def positional_encoding(H, W, dim, device):
    """(H*W, dim) sinusoids of y (first half) and x (second half)."""
    d = max(dim // 4, 1)
    # NOTE (deviation): base 100, where snmn's encoding uses 10000: wavelengths closer to grids of 6 to 14
    # cells (not measured against 10000)
    freq = torch.exp(-math.log(100.0) * torch.arange(d, device=device) / d)  # (d,)
    ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    pe = [f(v.reshape(-1, 1).float() * freq) for v in (ys, xs) for f in (torch.sin, torch.cos)]
    return F.pad(torch.cat(pe, 1), (0, dim - 4 * d))[:, :dim]           # (K, dim)


class InputUnit(nn.Module):
    """Image features (B, C, H, W) -> knowledge base (B, K, Dk); question -> words h_s (B, S, D),
    embeddings e_s (B, S, E), q (B, D)."""

    def __init__(self, cfg, info):
        super().__init__()
        if info["image_kind"] != "features":
            raise ValueError(f"Stack-NMN reads image features (B, C, H, W), not {info['image_kind']}")
        self.pe_dim = cfg.pe_dim
        C = info["image_shape"][0]
        self.kb = nn.Sequential(nn.Conv2d(C + cfg.pe_dim, cfg.kb_dim, 1), nn.ELU(),
                                nn.Conv2d(cfg.kb_dim, cfg.kb_dim, 1))   # official: conv1x1 ELU conv1x1
        self.embed = nn.Embedding(info["num_words"], cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.dim // 2, batch_first=True, bidirectional=True)

    def forward(self, image, question, question_len):
        B, _, H, W = image.shape
        pe = positional_encoding(H, W, self.pe_dim, image.device).t().reshape(1, -1, H, W).expand(B, -1, -1, -1)
        kb = self.kb(torch.cat([image, pe.to(image.dtype)], 1)).flatten(2).transpose(1, 2)  # (B, K, Dk)
        e = self.embed(question)                                         # (B, S, E)
        packed = pack_padded_sequence(e, question_len.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        hs, _ = pad_packed_sequence(out, batch_first=True, total_length=question.size(1))  # (B, S, D) Sec. 3.1: h_s
        return kb, hs, e, torch.cat([h[0], h[1]], -1)                    # Sec. 3.1: q, (B, D) both final states


# ----------------------------------------------------------------------------- the layout controller (Sec. 3.1)

def control_dim(cfg):
    """E, the size of c_t: the word embeddings' (control_over embeds) or the BiLSTM's (words)."""
    return cfg.embed_dim if cfg.control_over == "embeds" else cfg.dim


class Controller(nn.Module):
    """u = W2[W1^(t) q + b1; c_{t-1}] + b2; w(t) = softmax(W u); cv = softmax_s(W3 (u * h_s));
    c_t = sum_s cv_s e_s over the word embeddings e_s (official Stack-NMN; `control_over words`: over
    the BiLSTM states h_s, as the official LNMN code)."""

    def __init__(self, cfg, num_modules):
        super().__init__()
        D, E = cfg.dim, control_dim(cfg)
        self.q_step = nn.ModuleList(nn.Linear(D, D) for _ in range(cfg.max_steps))  # W1^(t), b1
        self.u = nn.Linear(D + E, D)                                     # W2, b2
        self.module_logits = nn.Linear(D, num_modules, bias=False)       # official LINEAR_MODULE_WEIGHTS
        self.attn = nn.Linear(D, 1)                                      # W3
        self.c_0 = nn.Parameter(torch.randn(E) / math.sqrt(E))          # official: c_init ~ N(0, 1/E)

    def forward(self, q, c_prev, hs, es, mask, t):
        """q (B, D), c_prev (B, E), hs (B, S, D) attended with u, es (B, S, E) averaged into c_t
        -> c_t (B, E), module logits (B, M) (w(t) is their softmax), cv (B, S)."""
        # Sec. 3.1: u = W2[W1^(t) q + b1; c_{t-1}] + b2
        u = self.u(torch.cat([self.q_step[t](q), c_prev], -1))           # (B, D)
        logits = self.module_logits(u)                                   # (B, M) Sec. 3.1: w(t) = softmax(MLP(u))
        # Sec. 3.1: cv_{t,s} = softmax_s(W3 (u * h_s)), over the question's own words
        cv = self.attn(u[:, None] * hs).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(-1)  # (B, S)
        c = (cv[..., None] * es).sum(1)                                  # (B, E) Sec. 3.1: c_t = sum_s cv_{t,s} e_s
        return c, logits, cv


# ----------------------------------------------------------------------------- the stack and the modules (Sec. 3.2)

def push(p):
    """Move the pointer up one slot (B, L); at the top it stays (official GUARD_STACK_PTR)."""
    up = F.pad(p[:, :-1], (1, 0))                                        # (B, L) Sec. 3.2: push, p'[l] = p[l - 1]
    return torch.cat([up[:, :-1], up[:, -1:] + p[:, -1:]], dim=1)        # clamp at the top


def pop(p):
    """Move the pointer down one slot (B, L); at the bottom it stays."""
    down = F.pad(p[:, 1:], (0, 1))                                       # (B, L) Sec. 3.2: pop, p'[l] = p[l + 1]
    return torch.cat([down[:, :1] + p[:, :1], down[:, 1:]], dim=1)       # clamp at the bottom


def read(A, p):
    """The map under the pointer: A (B, K, L), p (B, L) -> (B, K)."""
    return (A * p[:, None]).sum(-1)                                      # Sec. 3.2: read, sum_l A_l p_l


def write(A, p, att):
    """Write att (B, K) where the pointer is: A p-weighted towards att -> (B, K, L)."""
    return att[..., None] * p[:, None] + A * (1 - p[:, None])            # Sec. 3.2: write, att p + A (1 - p)


def l2norm(x):
    return F.normalize(x, dim=-1)


def attend(kb, att):
    """sum_k softmax(att)_k kb_k: (B, K, Dk), (B, K) -> (B, Dk)."""
    return (att.softmax(-1)[..., None] * kb).sum(1)


class Modules(nn.Module):
    """The nine modules, each (A, p, m, c) -> (A', p', m'). Attention maps are logits (B, K).
    Find, Transform, Filter, And, Or, Scene write the stack and output a zero memory; Answer and
    Compare leave the stack untouched (official KEEP_STACK) and output a memory; NoOp keeps all."""

    def __init__(self, cfg):
        super().__init__()
        Dk, E, Dm = cfg.kb_dim, control_dim(cfg), cfg.mem_dim
        self.find_c, self.find_conv = nn.Linear(E, Dk), nn.Linear(Dk, 1)  # Filter reuses these
        self.transform_c, self.transform_conv = nn.Linear(E, Dk), nn.Linear(Dk, 1)
        self.scene_conv = nn.Linear(Dk, 1)
        self.answer_c, self.answer_mem = nn.Linear(E, Dk), nn.Linear(E + Dm + Dk, Dm)
        self.compare_c, self.compare_mem = nn.Linear(E, Dk), nn.Linear(E + Dm + Dk, Dm)

    def find(self, kb, A, p, c):
        # Sec. 3.2: Find, conv1x1(l2norm(kb * W c)), pushed
        att = self.find_conv(l2norm(kb * self.find_c(c)[:, None])).squeeze(-1)  # (B, K)
        p = push(p)
        return write(A, p, att), p

    def and_or(self, A, p, fn):
        a2, p = read(A, p), pop(p)                                       # pop 2, push 1
        return write(A, p, fn(read(A, p), a2)), p

    def forward(self, kb, A, p, m, c):
        """-> stacks (B, K, L, M), pointers (B, L, M), memories (B, Dm, M), in MODULES order."""
        zero = torch.zeros_like(m)
        out = [(A, p, m)]                                                # Sec. 3.2: NoOp
        out.append((*self.find(kb, A, p, c), zero))                      # Sec. 3.2: Find, push
        a = read(A, p)                                                   # the top map
        x = attend(kb, a)                                                # (B, Dk)
        # Sec. 3.2: Transform, conv1x1(l2norm(kb * W c * x)) with x pooled under the top map; pop 1, push 1
        att = self.transform_conv(l2norm(kb * self.transform_c(c)[:, None] * x[:, None])).squeeze(-1)  # (B, K)
        out.append((write(A, p, att), p, zero))
        out.append((*self.and_or(*self.find(kb, A, p, c), torch.minimum), zero))  # Sec. 3.2: Filter = Find, then And
        out.append((*self.and_or(A, p, torch.minimum), zero))            # Sec. 3.2: And, min
        out.append((*self.and_or(A, p, torch.maximum), zero))            # Sec. 3.2: Or, max
        ps = push(p)
        out.append((write(A, ps, self.scene_conv(l2norm(kb)).squeeze(-1)), ps, zero))  # Sec. 3.2: Scene, push
        m1 = self.answer_mem(torch.cat([c, m, l2norm(self.answer_c(c) * x)], -1))  # (B, Dm) Sec. 3.2: Answer
        out.append((A, p, m1))
        x1 = attend(kb, read(A, pop(p)))                                 # the map under the top
        m2 = self.compare_mem(torch.cat([c, m, l2norm(self.compare_c(c) * x1 * x)], -1))  # (B, Dm) Sec. 3.2: Compare
        out.append((A, p, m2))
        return tuple(torch.stack(z, -1) for z in zip(*out))


# ----------------------------------------------------------------------------- soft execution (Sec. 3.3)

def sharpen(p, how, temp):
    """The averaged pointer back to (nearly) one-hot: argmax (official default) or softmax(p / temp)."""
    if how == "hard":
        return F.one_hot(p.argmax(-1), p.size(-1)).to(p.dtype)           # official USE_HARD_SHARPEN
    return (p / temp).softmax(-1)                                        # Sec. 3.3: softmax, official SOFT_SHARPEN_TEMP


def execute(w, As, ps, ms, how, temp):
    """Every module has run; w(t) (B, M) averages their stacks (B, K, L, M), pointers (B, L, M) and
    memories (B, Dm, M) -> A (B, K, L), p (B, L), m (B, Dm)."""
    A = (As * w[:, None, None]).sum(-1)                                  # (B, K, L) Sec. 3.3: A(t+1) = sum_m w_m A_m
    p = sharpen((ps * w[:, None]).sum(-1), how, temp)                    # (B, L) Sec. 3.3: p(t+1) = sharpen(sum_m w_m p_m)
    m = (ms * w[:, None]).sum(-1)                                        # (B, Dm) the memories alike
    return A, p, m


# ----------------------------------------------------------------------------- the model

def tf_init(model):
    """The official code's TensorFlow initialisers (util/cnn.py): Xavier-uniform weights and zero biases
    for every fc and 1x1 conv. It matters: a map's logits are w . l2norm(...), bounded by |w|, and
    PyTorch's default bound 1/sqrt(fan_in) is about sqrt(6) times below Xavier's sqrt(6 / (fan_in + 1))
    for these one-output convs, which keeps the maps near uniform for long (RESULTS.md, "Stack-NMN").
    NOTE (deviation): the word embeddings keep PyTorch's N(0, 1), not the official N(0, 1/E), which
    learned slower here; the LSTM keeps PyTorch's init too."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class StackNMN(nn.Module):
    """Stack-NMN with the step protocol of DESIGN.md.

    ctx   (fixed over steps): kb (B, K, Dk), words (B, S, D), embeds (B, S, E), word_mask (B, S),
          question (B, D).
    state (per step): stack (B, K, L), ptr (B, L), memory (B, Dm), control (B, E) c_t,
          module_logits (B, M), text_attn (B, S), attn (B, K) the map under the pointer.
    """
    module_names = MODULES

    def __init__(self, cfg, info):
        super().__init__()
        self.cfg, self.max_steps, self.halt_dim = cfg, cfg.max_steps, control_dim(cfg)
        self.progress = 0.0                                              # set by train.py: share of the run done
        self.program_tokens = info.get("program_tokens")
        self.input = InputUnit(cfg, info)
        self.modules_ = self.build_modules(cfg)
        self.controller = Controller(cfg, len(self.module_names))
        self.output = nn.Sequential(nn.Linear(cfg.dim + cfg.mem_dim, cfg.out_dim), nn.ELU(),
                                    nn.Dropout(cfg.output_dropout), nn.Linear(cfg.out_dim, info["num_answers"]))
        tf_init(self)

    def build_modules(self, cfg):
        return Modules(cfg)

    def encode(self, batch):
        kb, hs, es, q = self.input(batch["image"], batch["question"], batch["question_len"])
        mask = torch.arange(hs.size(1), device=hs.device)[None] < batch["question_len"][:, None]  # (B, S)
        return dict(kb=kb, words=hs, embeds=es, word_mask=mask, question=q)

    def init_state(self, ctx):
        kb, q = ctx["kb"], ctx["question"]
        B, K, L = len(q), kb.size(1), self.cfg.stack_len
        ptr = F.one_hot(torch.zeros(B, dtype=torch.long, device=q.device), L).to(q.dtype)  # (B, L) at the bottom
        return dict(stack=q.new_zeros(B, K, L), ptr=ptr, memory=q.new_zeros(B, self.cfg.mem_dim),
                    control=self.controller.c_0.expand(B, -1), module_logits=q.new_zeros(B, len(self.module_names)),
                    text_attn=q.new_zeros(B, ctx["words"].size(1)), attn=q.new_zeros(B, K))

    def step(self, ctx, state, t):
        """One controller step (Sec. 3.1), every module (Sec. 3.2), their soft average (Sec. 3.3)."""
        averaged = ctx[self.cfg.control_over]                            # (B, S, E) what c_t averages
        c, logits, cv = self.controller(ctx["question"], state["control"], ctx["words"], averaged,
                                        ctx["word_mask"], t)
        w = logits.softmax(-1)                                           # (B, M) Sec. 3.1: w(t)
        As, ps, ms = self.modules_(ctx["kb"], state["stack"], state["ptr"], state["memory"], c)
        A, p, m = execute(w, As, ps, ms, self.cfg.sharpen, self.cfg.sharpen_temp)
        return dict(stack=A, ptr=p, memory=m, control=c, module_logits=logits, text_attn=cv, attn=read(A, p))

    def classify(self, ctx, state):
        return self.output(torch.cat([ctx["question"], state["memory"]], -1))  # (B, A) output unit: [q; m_T]

    def halt_input(self, ctx, state):
        return state["control"]                                          # (B, E) c_t, read by DACT

    def run(self, batch):
        ctx = self.encode(batch)
        state = self.init_state(ctx)
        states = []
        for t in range(self.max_steps):
            state = self.step(ctx, state, t)
            states.append(state)
        return ctx, states

    def forward(self, batch):
        """batch: image (B, C, H, W), question (B, S), question_len (B,), program (B, P) ->
        log_probs (B, A), aux_loss (the layout or the entropy term, Sec. 3.4), metrics (--layout gt)."""
        ctx, states = self.run(batch)
        out = {"log_probs": self.classify(ctx, states[-1]).log_softmax(-1)}
        logits = torch.stack([s["module_logits"] for s in states], 1)    # (B, T, M)
        if self.cfg.layout == "gt":
            if self.program_tokens is None or batch["program"].size(1) < 3:
                raise ValueError("--layout gt needs CLEVR programs in the data")
            gt = self.layouts(batch["program"])                          # (B, T)
            out["aux_loss"] = self.cfg.layout_weight * layout_loss(logits, gt)
            out["metrics"] = {"layout_acc": layout_accuracy(logits, gt)}
        else:
            ramp = entropy_ramp(self.progress, self.cfg.entropy_begin, self.cfg.entropy_end)
            on = ramp > 0 and self.training
            out["aux_loss"] = self.cfg.entropy_weight * ramp * module_entropy(logits) if on else 0.0
        return out

    def layouts(self, program):
        """Expert layouts of a batch (B, T), NoOp-padded; -100 for a program longer than T."""
        prune = self.cfg.prune_filters
        rows = [_layout(tuple(self.program_tokens[i] for i in row.tolist() if i > data.UNK), prune)
                for row in program.cpu()]
        T = self.max_steps
        return torch.tensor([r + [NOOP] * (T - len(r)) if len(r) <= T else [-100] * T for r in rows],
                            device=program.device)

    def regularizer(self):
        """The weight decay, a term of the training loss only (the trainer adds it): wd / 2 * sum ||W||^2
        over the weight matrices, the word embeddings and the LSTM left out (official WEIGHT_DECAY)."""
        if not self.cfg.weight_decay:
            return 0.0
        return self.cfg.weight_decay / 2 * sum((p ** 2).sum() for n, p in self.named_parameters()
                                               if p.dim() > 1 and "embed" not in n and "lstm" not in n)


# ----------------------------------------------------------------------------- training terms (Sec. 3.4)

# official code (exp_clevr_snmn/data/get_ground_truth_layout.py): CLEVR function -> module
FUNCTION_MODULE = {"filter": FILTER, "same": TRANSFORM, "relate": TRANSFORM, "intersect": AND, "union": OR,
                   "equal": COMPARE, "greater_than": COMPARE, "less_than": COMPARE, "count": ANSWER,
                   "exist": ANSWER, "query": ANSWER, "scene": SCENE, "unique": None}
COMPARES = ("equal_", "greater_than", "less_than")
DROPPED_UNDER_COMPARE = ("count", "query_")  # Compare reads the two maps itself


def function_module(fn):
    return FUNCTION_MODULE[fn] if fn in FUNCTION_MODULE else FUNCTION_MODULE[fn.split("_")[0]]


def expert_layout(tokens, prune_filters=True):
    """Prefix program tokens -> module indices in execution (post-)order, as the official code:
    count / query_* under a comparison are dropped, `unique` is dropped, Scene + Filter -> Find; then,
    with prune_filters (the official data reader's default), every Filter that follows a Find or a Filter
    in that list is dropped: one textual parameter c_t can hold several attributes."""
    def visit(tree):
        fn, kids = data.token_function(tree["token"]), tree["children"]
        if fn.startswith(COMPARES):
            kids = [k["children"][0] if data.token_function(k["token"]).startswith(DROPPED_UNDER_COMPARE) else k
                    for k in kids]
        mods = [m for k in kids for m in visit(k)]
        return mods + ([] if function_module(fn) is None else [function_module(fn)])
    mods = visit(data.prefix_to_tree(list(tokens)))
    out = []
    for m in mods:
        if m == FILTER and out and out[-1] == SCENE:
            out[-1] = FIND
        else:
            out.append(m)
    if prune_filters:  # each Filter is judged by its predecessor before any pruning, as the official loop
        out = [m for i, m in enumerate(out) if not (m == FILTER and i > 0 and out[i - 1] in (FIND, FILTER))]
    return out


@lru_cache(maxsize=1 << 16)
def _layout(tokens, prune_filters):
    return expert_layout(tokens, prune_filters)


def layout_loss(logits, gt):
    """Sec. 3.4: cross-entropy of w(t) against the expert layout, logits (B, T, M), gt (B, T) (-100: none)."""
    return F.cross_entropy(logits.flatten(0, 1), gt.flatten(), ignore_index=-100)


def layout_accuracy(logits, gt):
    """(B,) share of the T steps whose argmax module is the expert's; 0 where the layout did not fit."""
    known = (gt >= 0).all(1)
    return (logits.argmax(-1) == gt).float().mean(1) * known


def entropy_ramp(progress, begin, end):
    """The entropy term's weight, 0 -> 1 between the fractions begin and end of the run
    (official 'warmup_scaling')."""
    return min(max((progress - begin) / max(end - begin, 1e-9), 0.0), 1.0)


def module_entropy(logits):
    """Sec. 3.4: the entropy of w(t), averaged over the steps and the batch; logits (B, T, M)."""
    w = logits.softmax(-1)
    return -(w * w.clamp(min=1e-5).log()).sum(-1).mean()


Config, Model = StackNMNConfig, StackNMN  # names the trainer's registry looks for


def smoke():
    torch.manual_seed(0)
    info = dict(num_words=20, num_answers=7, image_kind="features", image_shape=(18, 6, 6),
                program_tokens=["<NULL>", "<START>", "<END>", "<UNK>", "count", "scene", "filter_color[red]"])
    cfg = StackNMNConfig(layout="gt", dim=32, embed_dim=16, kb_dim=16, pe_dim=8, mem_dim=16, out_dim=16)
    model = StackNMN(cfg, info)
    lens = torch.tensor([9, 5, 3, 7])
    batch = dict(image=torch.rand(4, 18, 6, 6), question=torch.randint(4, 20, (4, 9)) * (torch.arange(9) < lens[:, None]),
                 question_len=lens, program=torch.tensor([[1, 4, 6, 5, 2]] * 4), answer=torch.randint(0, 7, (4,)))
    out = model(batch)
    loss = F.nll_loss(out["log_probs"], batch["answer"]) + out["aux_loss"] + model.regularizer()
    loss.backward()
    print(f"log_probs {tuple(out['log_probs'].shape)}  loss {loss.item():.3f}  "
          f"params {sum(p.numel() for p in model.parameters()):,}")


if __name__ == "__main__":
    smoke()
