"""MAC network: a recurrent cell that reasons over an image in T attention steps.

Paper: D. A. Hudson, C. D. Manning, "Compositional Attention Networks for Machine Reasoning",
ICLR 2018, arXiv:1803.03067. Official code: stanfordnlp/mac-network (TensorFlow); the PyTorch port
closest to it: ceyzaguirre4/mac-network-pytorch (the base of the DACT code).

This file holds the input unit (image stem + BiLSTM question encoder), the MAC cell's control,
read and write units, the output classifier, and the `MAC` model that exposes the step protocol
(encode / init_state / step / classify / halt_input) that act.py and dact.py wrap.
Equation numbers follow the arXiv version of the paper (Sec. 3: control (1)-(3), read (4)-(6),
write (7)-(9)); each tag sits on the line that implements the equation.

Shapes:
    B  batch               L  question tokens (incl. <START>/<END>, padded with 0)
    K  = H*W knowledge cells (14*14 = 196 for ResNet features), or objects (up to 100 on GQA)
    D  hidden size (cfg.dim)    E  word-embedding size    T  reasoning steps    A  answers
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class MACConfig:
    dim: int = 512                         # Sec. 4: hidden size d (BiLSTM: dim // 2 per direction)
    embed_dim: int = 300                   # official code: word-embedding size
    max_steps: int = 12                    # Sec. 4: 12 reasoning steps on CLEVR
    stem_dropout: float = 0.18             # official code: stemDropout keep 0.82
    question_dropout: float = 0.08         # official code: qDropout keep 0.92
    memory_dropout: float = 0.15           # official code: memoryDropout keep 0.85 (variational)
    output_dropout: float = 0.15           # official code: outputDropout keep 0.85
    read_dropout: float = 0.15             # official code: readDropout keep 0.85; placed as DACT-MAC (see ReadUnit)
    official_init: bool = True             # both official codes: Xavier-uniform stem convs, zero biases; DACT-MAC: Xavier word embeddings
    self_attention: bool = False           # Sec. 3.2.3: write-unit self-attention, Eq. (8); off for CLEVR
    memory_gate: bool = False              # Sec. 3.2.3: write-unit memory gate, Eq. (9); off for CLEVR
    gate: Literal["dact", "tf"] = "dact"   # dact: Eq. (9), one gate on the old memory, +1 (DACT-MAC); tf: per dimension on the new memory, +1
    pixel_channels: tuple = (32, 64, 128)  # NOTE (deviation): pixel stem, see PixelStem
    coord_conv: bool = True                # NOTE (deviation): CoordConv, see PixelStem
    object_boxes: bool = False             # NOTE (deviation): GQA: append each object's box to its features
    output_dim: int = 0                    # official code: the classifier's hidden layer, 512 (= d); 0: d


# Smaller sizes for a CPU run on the built-in mini-CLEVR (not from the paper; its time and accuracy are
# in RESULTS.md). Keys that are not MACConfig fields set the training recipe (train.Recipe) or the trainer.
PRESETS = {
    # the paper's training recipe (the sizes are MACConfig's defaults):
    "paper": dict(lr=1e-4, batch_size=64,  # Sec. 4: Adam 1e-4, batch 64
                  epochs=25,  # stanfordnlp/mac-network README: --epochs 25
                  clip=8.0, ema=0.999,  # official code: gradient norm clipped at 8, weights' moving average 0.999
                  schedule="plateau",  # DACT-MAC: on the val accuracy (MAC's TF code halves on the training loss)
                  lr_factor=0.5, lr_patience=0,  # DACT-MAC train.py: ReduceLROnPlateau(factor=0.5, patience=0, ...
                  lr_threshold=1e-3),  # ... threshold=0.001): halve after the first epoch without a 0.1% gain
    "laptop": dict(dim=64, embed_dim=64, pixel_channels=(32, 64, 64),
                   max_steps=8,  # the paper has 12; 8 train 1.3x the questions/s, so 11 epochs fit in 14 minutes
                   stem_dropout=0.0, question_dropout=0.0, memory_dropout=0.0, output_dropout=0.0, read_dropout=0.0,
                   official_init=False,  # the preset's measured runs used PyTorch's init for the stem and embeddings
                   lr=2e-3, batch_size=128, epochs=11, lr_patience=2, lr_threshold=1e-4, threads=2,
                   clip=8.0, ema=0.999, schedule="plateau", lr_factor=0.5,  # what its measured runs used
                   # Exist and Query Attribute (every relate question) twice an epoch in epochs 1-3: relations first
                   kind_repeats=(1, 2, 1, 2, 1), repeat_epochs=3),
    # GQA, as the DACT code trains MAC on it (config/gqa_defaults.py; DACT paper Sec. 5): 4 steps,
    # 5 epochs; train.py picks it when the data's info.json says GQA
    "gqa": dict(max_steps=4, epochs=5,  # ACT.MAX_ITER 4, SOLVER.EPOCHS 5
                lr=1e-4, batch_size=64, clip=8.0,  # SOLVER.LR, DATALOADER.BATCH_SIZE, SOLVER.GRAD_CLIP: the paper's
                ema=0.999, schedule="plateau",  # train.py: accumulate(decay=0.999), SOLVER.USE_SCHEDULER
                lr_factor=0.5, lr_patience=0, lr_threshold=1e-3),  # train.py: ReduceLROnPlateau, as on CLEVR
}


def add_coords(x):
    """(B, C, H, W) -> (B, C + 2, H, W): append x and y coordinates in [-1, 1] (CoordConv)."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
    xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
    return torch.cat([x, xs, ys], dim=1)


# ----------------------------------------------------------------------------- input unit (Sec. 3.1)

class FeatureStem(nn.Module):
    """ResNet-101 conv4 features (B, 1024, 14, 14) -> (B, D, 14, 14), as in the official code."""

    def __init__(self, cfg, in_channels):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(cfg.stem_dropout), nn.Conv2d(in_channels, cfg.dim, 3, padding=1), nn.ELU(),
            nn.Dropout(cfg.stem_dropout), nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1), nn.ELU())

    def forward(self, x):
        return self.net(x)


class PixelStem(nn.Module):
    """Raw pixels (B, 3, H, W) in [0, 1] -> (B, D, H / 2^n, W / 2^n) with n = len(pixel_channels).

    NOTE (deviation): the paper reads frozen ResNet-101 features; this small CNN trained from
    scratch lets the model run on the built-in drawn images without a pretrained network.
    NOTE (deviation): coordinate channels (CoordConv) on the input and before the last conv,
    because on small drawn images position is the only cue for left/right/front/behind.
    GroupNorm rather than BatchNorm keeps every example independent of its batch (row-indexing
    by ACT/DACT, tiny batches) and leaves no running statistics for weight-EMA to miss.
    """

    def __init__(self, cfg, in_channels):
        super().__init__()
        self.coords = 2 if cfg.coord_conv else 0
        layers, c = [], in_channels + self.coords
        for ch in cfg.pixel_channels:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, ch), ch), nn.ELU()]
            c = ch
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(cfg.stem_dropout)
        self.out = nn.Conv2d(c + self.coords, cfg.dim, 3, padding=1)

    def forward(self, x):
        if self.coords:
            x = add_coords(x)                                            # (B, 3 + 2, H, W)
        x = self.body(x)                                                 # (B, C, H', W')
        if self.coords:
            x = add_coords(x)                                            # (B, C + 2, H', W')
        return F.elu(self.out(self.drop(x)))                             # (B, D, H', W')


class ObjectStem(nn.Module):
    """Object features (B, K, F) -> (B, K, D): the feature stem with 1x1 kernels, as the DACT code on
    GQA (STEM_FILTER_SIZE 1): a 1x1 conv over objects is a Linear on each object's vector."""

    def __init__(self, cfg, in_features):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(cfg.stem_dropout), nn.Linear(in_features, cfg.dim), nn.ELU(),
            nn.Dropout(cfg.stem_dropout), nn.Linear(cfg.dim, cfg.dim), nn.ELU())

    def forward(self, x):
        return self.net(x)


class InputUnit(nn.Module):
    """Image -> knowledge base k (B, K, D); question -> contextual words cw (B, L, D) and q (B, D)."""

    def __init__(self, cfg, info):
        super().__init__()
        assert cfg.dim % 2 == 0, "the BiLSTM gives dim // 2 per direction"
        C = info["image_shape"][0]
        self.objects = info["image_kind"] == "objects"                  # image (B, K, F): GQA's objects
        self.boxes = self.objects and cfg.object_boxes
        if self.objects:
            self.stem = ObjectStem(cfg, info["image_shape"][-1] + 4 * cfg.object_boxes)
        else:
            self.stem = PixelStem(cfg, C) if info["image_kind"] == "pixels" else FeatureStem(cfg, C)
        self.embed = nn.Embedding(info["num_words"], cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.dim // 2, batch_first=True, bidirectional=True)
        self.q_drop = nn.Dropout(cfg.question_dropout)

    def forward(self, image, question, question_len, boxes=None):
        if self.objects:
            if self.boxes:
                if boxes is None:
                    raise ValueError("object_boxes is on, but the batch has no 'boxes'")
                image = torch.cat([image, boxes.to(image.dtype)], dim=-1)  # (B, K, F + 4)
            k = self.stem(image)                                         # (B, K, D)
        else:
            k = self.stem(image)                                         # (B, D, H', W')
            k = k.flatten(2).transpose(1, 2).contiguous()                # (B, K, D), rows contiguous
        L = question.size(1)
        lens = question_len.clamp(min=1).cpu()
        words = self.embed(question)                                     # (B, L, E)
        packed = pack_padded_sequence(words, lens, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)                                  # h: (2, B, D/2)
        cw, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, D), 0 at pads
        q = self.q_drop(torch.cat([h[0], h[1]], dim=-1))                 # (B, D) [h_fw_last; h_bw_first]
        return k, cw, q


# ----------------------------------------------------------------------------- control unit (Sec. 3.2.1)

class ControlUnit(nn.Module):
    """Attends over the question words: c_i = sum_s cv_{i,s} cw_s."""

    def __init__(self, dim, max_steps):
        super().__init__()
        self.q_shared = nn.Linear(dim, dim)                              # official code: tanh(W q)
        self.q_step = nn.ModuleList(nn.Linear(dim, dim) for _ in range(max_steps))  # one W_i per step
        self.cq = nn.Linear(2 * dim, dim)
        self.attn = nn.Linear(dim, 1)

    def forward(self, c_prev, q, cw, word_mask, t):
        q_i = self.q_step[t](torch.tanh(self.q_shared(q)))               # (B, D) Eq. (1), position-aware
        cq = self.cq(torch.cat([c_prev, q_i], dim=-1))                   # (B, D) Eq. (2)
        ca = self.attn(cq[:, None] * cw).squeeze(-1)                     # (B, L) Eq. (3a)
        ca = ca.masked_fill(~word_mask, float("-inf"))                   # padding gets no weight
        cv = ca.softmax(dim=-1)                                          # (B, L) Eq. (3b)
        c_i = (cv[..., None] * cw).sum(1)                                # (B, D) Eq. (3c)
        return c_i, cv


# ----------------------------------------------------------------------------- read unit (Sec. 3.2.2)

class ReadUnit(nn.Module):
    """Retrieves r_i from the knowledge base, guided by the memory m_{i-1} and the control c_i."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.mem_proj = nn.Linear(dim, dim)                              # W_m, Eq. (4)
        self.kb_proj = nn.Linear(dim, dim)                               # W_k, Eq. (4), applied in precompute
        self.concat = nn.Linear(2 * dim, dim)                            # W, Eq. (5)
        self.concat2 = nn.Linear(dim, dim)                               # official code: ELU + 2nd layer
        self.attn = nn.Linear(dim, 1)

    def precompute(self, k):
        """The step-independent part: W_k k, and the half of Eq. (5)'s W [I; W_k k] + b that acts on
        W_k k, bias included (computed once instead of at every step; equal up to float rounding)."""
        k_proj = self.kb_proj(k)                                         # (B, K, D)
        D = k_proj.size(-1)
        return k_proj, F.linear(k_proj, self.concat.weight[:, D:], self.concat.bias)  # (B, K, D)

    def forward(self, m_prev, k, k_proj, k_half, c_i, k_mask=None):
        if self.training and self.drop.p > 0:
            # official code (DACT-MAC): a new dropout mask on k at every step, so W_k k is computed again
            # here; at evaluation dropout is the identity and the precomputed k_proj, k_half are exact
            k = self.drop(k)                                             # (B, K, D)
            k_proj, k_half = self.precompute(k)
        I = self.mem_proj(m_prev)[:, None] * k_proj                      # (B, K, D) Eq. (4)
        # official code: concatenates the projected k (the paper writes the raw k_{h,w}). Computed as
        # W's I-half on I plus k_half (W's other half on W_k k, plus b: precomputed once per image);
        # tests/test_mac.py checks this equals self.concat(torch.cat([I, k_proj], -1)).
        # Eq. (5): I' = W [I; W_k k] + b
        I = F.linear(I, self.concat.weight[:, :I.size(-1)]) + k_half     # (B, K, D) Eq. (5)
        I = self.concat2(F.elu(I))                                       # (B, K, D) official code
        ra = self.attn(self.drop(F.elu(I * c_i[:, None]))).squeeze(-1)   # (B, K) Eq. (6a), the code's ELU and dropout
        if k_mask is not None:                                           # GQA: padded objects get no weight
            ra = ra.masked_fill(~k_mask, float("-inf"))
        rv = ra.softmax(dim=-1)                                          # (B, K) Eq. (6b)
        r_i = (rv[..., None] * k).sum(1)                                 # (B, D) Eq. (6c)
        return r_i, rv


# ----------------------------------------------------------------------------- write unit (Sec. 3.2.3)

class WriteUnit(nn.Module):
    """Integrates r_i into the memory; optional self-attention and memory gate."""

    def __init__(self, dim, self_attention, memory_gate, gate="dact"):
        super().__init__()
        self.info = nn.Linear(2 * dim, dim)
        self.self_attention, self.memory_gate = self_attention, memory_gate
        if self_attention:
            self.sa_attn = nn.Linear(dim, 1)
            self.sa_proj = nn.Linear(dim, dim, bias=False)
            self.info_proj = nn.Linear(dim, dim)
        if memory_gate:
            # paper and DACT-MAC: one scalar gate W^{1xd} c_i on the old memory; TF: one per dimension, on
            # the new memory. Both add +1 inside the sigmoid (73% of the weighted memory at the start).
            self.gate_on_old = gate == "dact"
            self.gate = nn.Linear(dim, 1 if self.gate_on_old else dim)

    def forward(self, r_i, m_prev, c_i, controls=None, memories=None):
        m = self.info(torch.cat([r_i, m_prev], dim=-1))                  # (B, D) Eq. (7)
        if self.self_attention:                                          # controls, memories: (B, t, D)
            sa = self.sa_attn(c_i[:, None] * controls).squeeze(-1).softmax(dim=-1)  # (B, t) Eq. (8a)
            m_sa = (sa[..., None] * memories).sum(1)                     # (B, D) Eq. (8b)
            m = self.sa_proj(m_sa) + self.info_proj(m)                   # (B, D) Eq. (8c)
        if self.memory_gate:
            z = torch.sigmoid(self.gate(c_i) + 1)                        # (B, 1), tf (B, D) Eq. (9a)
            m = z * m_prev + (1 - z) * m if self.gate_on_old else z * m + (1 - z) * m_prev  # (B, D) Eq. (9b)
        return m


# ----------------------------------------------------------------------------- output unit (Sec. 3.3)

class OutputUnit(nn.Module):
    """[m_T; W q] -> 2-layer classifier -> answer logits."""

    def __init__(self, dim, num_answers, dropout, hidden=0):
        super().__init__()
        hidden = hidden or dim
        self.q_proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * dim, hidden), nn.ELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_answers))

    def forward(self, m, q):
        return self.mlp(torch.cat([m, self.q_proj(q)], dim=-1))          # (B, A)


# ----------------------------------------------------------------------------- the model

class MAC(nn.Module):
    """MAC network with the step protocol of DESIGN.md.

    ctx   (from encode, fixed over steps): knowledge (B, K, D), knowledge_proj (B, K, D),
          knowledge_half (B, K, D) (the step-independent half of Eq. (5)),
          words (B, L, D), word_mask (B, L) bool, question (B, D), memory_mask (B, D), and with
          object features (GQA) knowledge_mask (B, K) bool, False at the padded objects.
    state (per step): control (B, D), memory (B, D), control_attn (B, L), read_attn (B, K),
          and with self-attention the histories controls, memories (B, t + 1, D).
    """

    def __init__(self, cfg: MACConfig, info: dict):
        super().__init__()
        self.cfg, self.max_steps = cfg, cfg.max_steps
        D = cfg.dim
        self.input = InputUnit(cfg, info)
        self.control = ControlUnit(D, cfg.max_steps)
        self.read = ReadUnit(D, cfg.read_dropout)
        self.write = WriteUnit(D, cfg.self_attention, cfg.memory_gate, cfg.gate)
        self.output = OutputUnit(D, info["num_answers"], cfg.output_dropout, cfg.output_dim)
        self.m_0 = nn.Parameter(torch.zeros(D))                         # learned initial memory
        for mod in self.modules():                                       # official code: Xavier, zero bias
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        if cfg.official_init:  # both official codes: the stem convs Xavier too; DACT-MAC: the word embeddings
            convs = [m for m in self.input.stem.modules() if isinstance(m, nn.Conv2d)]
            for conv in convs if isinstance(self.input.stem, FeatureStem) else []:  # not the pixel stem (ours)
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
            with torch.no_grad():
                nn.init.xavier_uniform_(self.input.embed.weight)
                self.input.embed.weight[0] = 0                          # <NULL>, the padding_idx row

    def encode(self, batch):
        k, cw, q = self.input(batch["image"], batch["question"], batch["question_len"], batch.get("boxes"))
        L = cw.size(1)
        word_mask = torch.arange(L, device=cw.device)[None] < batch["question_len"][:, None]  # (B, L)
        # variational dropout: one mask per example, reused at every step (official code);
        # kept in ctx so that a wrapper indexing rows keeps each row's own mask
        p = self.cfg.memory_dropout
        memory_mask = torch.ones_like(q)                                 # (B, D)
        if self.training and p > 0:
            memory_mask = torch.bernoulli(torch.full_like(q, 1 - p)) / (1 - p)
        k_proj, k_half = self.read.precompute(k)
        ctx = dict(knowledge=k, knowledge_proj=k_proj, knowledge_half=k_half, words=cw,
                   word_mask=word_mask, question=q, memory_mask=memory_mask)
        if "num_objects" in batch:  # at least one cell stays readable, so the softmax is never 0/0
            n = batch["num_objects"].clamp(min=1)
            ctx["knowledge_mask"] = torch.arange(k.size(1), device=k.device)[None] < n[:, None]  # (B, K)
        return ctx

    def init_state(self, ctx):
        q = ctx["question"]
        B, L, K = q.size(0), ctx["words"].size(1), ctx["knowledge"].size(1)
        state = dict(control=q, memory=self.m_0.expand(B, -1),          # c_0 = q, m_0 learned
                     control_attn=q.new_zeros(B, L), read_attn=q.new_zeros(B, K))
        if self.cfg.self_attention:
            # as in the official code, the history starts with (c_0, m_0), so step 1 has something
            # to attend to (the paper's Eq. (8a) ranges over j < i only)
            state["controls"], state["memories"] = state["control"][:, None], state["memory"][:, None]
        return state

    def step(self, ctx, state, t):
        """One MAC cell: state at step t (0-based) -> state at step t + 1."""
        if not 0 <= t < self.max_steps:
            raise IndexError(f"step {t} out of range: this MAC has {self.max_steps} position-aware "
                             "projections (set max_steps in the config)")
        c, cv = self.control(state["control"], ctx["question"], ctx["words"], ctx["word_mask"], t)
        # official code: the memory dropout mask applies where the read unit reads m_{i-1}
        r, rv = self.read(state["memory"] * ctx["memory_mask"], ctx["knowledge"], ctx["knowledge_proj"],
                         ctx["knowledge_half"], c, ctx.get("knowledge_mask"))
        m = self.write(r, state["memory"], c, state.get("controls"), state.get("memories"))
        new = dict(control=c, memory=m, control_attn=cv, read_attn=rv)
        if self.cfg.self_attention:
            new["controls"] = torch.cat([state["controls"], c[:, None]], dim=1)  # (B, t + 2, D)
            new["memories"] = torch.cat([state["memories"], m[:, None]], dim=1)  # (B, t + 2, D)
        return new

    def classify(self, ctx, state):
        return self.output(state["memory"], ctx["question"])             # (B, A) logits

    def halt_input(self, ctx, state):
        return state["control"]                                          # (B, D) c_t, read by DACT

    def forward(self, batch):
        """batch: image (B, C, H, W), question (B, L), question_len (B,) -> {log_probs: (B, A)}."""
        ctx = self.encode(batch)
        state = self.init_state(ctx)
        for t in range(self.max_steps):
            state = self.step(ctx, state, t)
        return {"log_probs": self.classify(ctx, state).log_softmax(dim=-1)}


Config, Model = MACConfig, MAC  # names the trainer's registry looks for


if __name__ == "__main__":
    torch.manual_seed(0)
    B, L = 4, 9
    for kind, shape in [("pixels", (3, 32, 32)), ("features", (1024, 14, 14)), ("objects", (10, 64))]:
        info = dict(num_words=20, num_answers=7, image_kind=kind, image_shape=shape)
        cfg = MACConfig(dim=32, embed_dim=16, max_steps=3, pixel_channels=(8, 16),
                        self_attention=True, memory_gate=True)
        model = MAC(cfg, info)
        lens = torch.tensor([9, 5, 3, 7])
        question = torch.randint(3, 20, (B, L)) * (torch.arange(L) < lens[:, None])
        batch = dict(image=torch.rand(B, *shape), question=question, question_len=lens,
                     answer=torch.randint(0, 7, (B,)))
        if kind == "objects":
            batch.update(boxes=torch.rand(B, 10, 4), num_objects=torch.tensor([10, 3, 1, 6]))
        out = model(batch)
        loss = F.nll_loss(out["log_probs"], batch["answer"])
        loss.backward()
        n = sum(p.numel() for p in model.parameters())
        print(f"{kind}: log_probs {tuple(out['log_probs'].shape)}  loss {loss.item():.3f}  params {n:,}")
