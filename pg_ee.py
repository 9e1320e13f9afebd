"""Program generator + execution engine (IEP): an LSTM writes the question's program, a network
assembled from one neural module per program token runs it on the image and answers.

Paper: J. Johnson, B. Hariharan, L. van der Maaten, J. Hoffman, L. Fei-Fei, C. L. Zitnick, R. Girshick,
"Inferring and Executing Programs for Visual Reasoning", ICCV 2017, arXiv:1705.03633.
Official code: facebookresearch/clevr-iep.

This file holds, in the paper's order, the program generator (seq2seq LSTM, Sec. 3.1), the execution
engine (stem, a module bank with one residual module per program token, classifier, Sec. 3.2; run by
topo_exec.py, batched by (height, module) as in papers/fast-clevr-topological-batching.md, or per
example as clevr-iep's recursion), REINFORCE with a moving-average baseline (Sec. 3.3), and `PGEE`,
the model that the trainer runs in one of the paper's three training stages (Sec. 4.1):

    python train.py pg_ee --stage ee                                  # EE on ground-truth programs
    python train.py pg_ee --stage pg --num-programs 5000 --init EE    # PG on 5,000 programs (EE kept)
    python train.py pg_ee --stage joint --init PG --lr 1e-5           # EE on sampled programs, PG by REINFORCE

Validation answers with ground-truth programs in the ee stage, with the PG's greedy programs in
the pg and joint stages, and reports the PG's exact-match program accuracy (`program_acc`) there.

Shapes:
    B  batch                L  question tokens (<START> words <END>, padded with 0)
    P  program tokens (prefix, <START> ... <END>, padded with 0)     T  decoded program tokens
    V  program vocabulary   E  embedding size     D  LSTM hidden size
    C  module channels      H, W  image-feature map (14 x 14 ResNet-101 conv4 on CLEVR)     A  answers
"""
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical

import data
import topo_exec

NULL, START, END, UNK = data.NULL, data.START, data.END, data.UNK
SUBSET_STREAM = 0x9E3779B9  # any constant that no epoch number reaches: tags the program subset's draw


@dataclass
class PGEEConfig:
    stage: Literal["pg", "ee", "joint"] = "ee"  # Sec. 4.1: pg / ee on ground-truth programs; joint: REINFORCE
    num_programs: int = 0  # Sec. 4.1: pg stage on a seeded random subset of N ground-truth programs (0: all)
    program_seed: int = 0  # NOTE (deviation): which N programs: a seeded random subset, not the first N
    # topo: topo_exec.run_topo, the topological-batching paper; naive: topo_exec.run_naive, clevr-iep's
    # recursion; the same answers. topo_exec.py's other schedules (postorder, agenda, level) are benchmark
    # variants, compared in its benchmark, not model settings.
    exec: Literal["topo", "naive"] = "topo"  # EE executor: by (height, module) (topo) or per example (naive)
    embed_dim: int = 300  # clevr-iep: word and program-token embeddings (wordvec_dim)
    hidden_dim: int = 256  # clevr-iep: LSTM hidden size (rnn_hidden_dim)
    rnn_layers: int = 2  # clevr-iep: 2-layer encoder and decoder LSTMs
    max_program_len: int = 30  # clevr-iep: programs are sampled for at most 30 tokens
    module_dim: int = 128  # Sec. 3.2: stem and modules are 128 channels wide
    classifier_proj_dim: int = 512  # Sec. 3.2: classifier conv1x1 128 -> 512
    classifier_fc_dim: int = 1024  # Sec. 3.2: classifier FC 512*7*7 -> 1024
    reward_decay: float = 0.9  # clevr-iep: moving-average baseline b <- 0.9 b + 0.1 mean(reward)


# `laptop`: smaller sizes for one CPU thread on the built-in mini-CLEVR, not from the paper (time per step
# and accuracy, also with more training images, in RESULTS.md); lr 5e-4 and batch 64 are the IEP paper's
# (Sec. 4.1). Keys that are not PGEEConfig fields set the training recipe (train.Recipe) or the trainer. The
# joint stage needs --lr 1e-5 here: at 5e-4 Adam's steps wreck the PG (RESULTS.md).
PRESETS = {
    # clevr-iep's recipe (scripts/train_model.py, TRAINING.md)
    "paper": dict(lr=5e-4, batch_size=64,  # Sec. 4.1, train_model.py: Adam 5e-4, batch 64
                  clip=0.0, ema=0.0,  # train_model.py: no gradient clipping, no moving average of the weights
                  schedule="constant",  # train_model.py: no learning-rate schedule
                  epochs=9),  # the EE's 100K iterations x 64 questions: 9.1 epochs of CLEVR's 700K (the PG's 20K
    # iterations on 18K programs are 71 epochs of its subset: pass --epochs 71 with --stage pg)
    "laptop": dict(embed_dim=64, hidden_dim=128, module_dim=32, classifier_proj_dim=64, classifier_fc_dim=256,
                   lr=5e-4, batch_size=64, epochs=7, lr_patience=2, lr_threshold=1e-4, threads=1,
                   clip=8.0, ema=0.999, schedule="plateau", lr_factor=0.5),  # what its measured runs used
}


# ----------------------------------------------------------------------------- program generator (Sec. 3.1)

class ProgramGenerator(nn.Module):
    """Seq2seq: encoder LSTM over the question, decoder LSTM that writes prefix program tokens.
    The decoder's input at every step is [encoder vector; embedding of the previous token]."""

    def __init__(self, cfg, num_words, num_tokens):
        super().__init__()
        E, D = cfg.embed_dim, cfg.hidden_dim
        self.encoder_embed = nn.Embedding(num_words, E)
        self.encoder = nn.LSTM(E, D, cfg.rnn_layers, batch_first=True)
        self.decoder_embed = nn.Embedding(num_tokens, E)
        self.decoder = nn.LSTM(D + E, D, cfg.rnn_layers, batch_first=True)
        self.out = nn.Linear(D, num_tokens)
        # NOTE (deviation): clevr-iep may sample <NULL>, <START> or <UNK> (never in a target) and then
        # runs whatever module it has for them; here the decoder never emits them.
        banned = torch.zeros(num_tokens, dtype=torch.bool)
        banned[[NULL, START, UNK]] = True
        self.register_buffer("banned", banned, persistent=False)

    def encode(self, question, question_len):
        """question (B, L), question_len (B,) -> (B, D): the top layer's state at the last non-NULL token."""
        h, _ = self.encoder(self.encoder_embed(question))                # (B, L, D); padding comes after it
        return h[torch.arange(len(h), device=h.device), question_len - 1]  # (B, D)

    def step_logits(self, enc, tokens, state=None):
        """enc (B, D), previous tokens (B, T) -> logits of the next ones (B, T, V), LSTM state."""
        enc_t = enc[:, None].expand(-1, tokens.size(1), -1)              # (B, T, D) at every step
        x = torch.cat([enc_t, self.decoder_embed(tokens)], -1)           # (B, T, D + E)
        h, state = self.decoder(x, state)                                # (B, T, D)
        return self.out(h).masked_fill(self.banned, float("-inf")), state  # (B, T, V)

    def teacher_forced(self, enc, program):
        """Logits of program[:, 1:] given program[:, :-1] (B, P - 1, V): the pg stage's training."""
        return self.step_logits(enc, program[:, :-1])[0]

    def decode(self, enc, max_len, sample):
        """Greedy (sample=False) or sampled programs, prefix tokens after <START>:
        -> tokens (B, T) (rows that ended keep sampling; what follows <END> is ignored downstream),
        logits (B, T, V)."""
        token = torch.full((len(enc),), START, dtype=torch.long, device=enc.device)  # (B,)
        done = torch.zeros_like(token, dtype=torch.bool)
        tokens, logits, state = [], [], None
        for _ in range(max_len):
            logit, state = self.step_logits(enc, token[:, None], state)  # (B, 1, V)
            logit = logit[:, 0]                                          # (B, V)
            token = Categorical(logits=logit).sample() if sample else logit.argmax(-1)  # (B,)
            tokens.append(token), logits.append(logit)
            done = done | (token == END)
            if done.all():
                break
        return torch.stack(tokens, 1), torch.stack(logits, 1)           # (B, T), (B, T, V)


def after_end(tokens):
    """(B, T) tokens -> (B, T) bool: True strictly after each row's first <END>."""
    ended = (tokens == END).long().cumsum(1)                             # (B, T) <END>s so far, this one too
    return (ended - (tokens == END).long()) > 0


def program_match(pred, target):
    """Exact match of decoded programs (B, T) with ground truth (B, P) (<START> first): equal up to and
    including <END>. -> (B,) bool."""
    pred = pred.masked_fill(after_end(pred), NULL)
    target = target[:, 1:]                                               # (B, P - 1) after <START>
    n = max(pred.size(1), target.size(1))
    pad = lambda x: F.pad(x, (0, n - x.size(1)), value=NULL)
    return (pad(pred) == pad(target)).all(1)


# ----------------------------------------------------------------------------- execution engine (Sec. 3.2)

class ExecutionEngine(nn.Module):
    """Stem, one module per program token (topo_exec.make_bank: residual blocks; binary modules
    concatenate their two inputs first), classifier. Runs B programs on B images."""

    def __init__(self, cfg, info):
        super().__init__()
        C_in, H, W = info["image_shape"]
        C = cfg.module_dim
        if cfg.exec not in ("topo", "naive"):
            raise ValueError(f"exec {cfg.exec!r}: the model runs 'topo' or 'naive'; the other schedules of "
                             "topo_exec.py are benchmark variants")
        self.exec = cfg.exec
        self.stem = nn.Sequential(nn.Conv2d(C_in, C, 3, padding=1), nn.ReLU(),   # Sec. 3.2: 2 x (conv3x3, ReLU)
                                  nn.Conv2d(C, C, 3, padding=1), nn.ReLU())
        tokens = [t for t in info["program_tokens"] if t not in data.SPECIALS]
        self.bank = topo_exec.make_bank(tokens, C)                       # token -> ResBlock / ConcatBlock
        # Sec. 3.2: conv1x1, ReLU, maxpool 2x2, FC, ReLU, FC; the first FC is sized to the input resolution
        self.classifier = nn.Sequential(
            nn.Conv2d(C, cfg.classifier_proj_dim, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(cfg.classifier_proj_dim * (H // 2) * (W // 2), cfg.classifier_fc_dim), nn.ReLU(),
            nn.Linear(cfg.classifier_fc_dim, info["num_answers"]))

    def forward(self, image, programs):
        """image (B, C_in, H, W), programs: B prefix token lists -> answer logits (B, A)."""
        feats = self.stem(image)                                         # (B, C, H, W)
        if self.exec == "naive":                                         # clevr-iep: one call per node
            roots = topo_exec.run_naive(programs, self.bank, feats)      # (B, C, H, W)
        else:                                                            # one call per (height, module)
            plan = topo_exec.make_plan(programs, self.bank, "height", feats.device)
            roots = topo_exec.run_topo(plan, self.bank, feats)           # (B, C, H, W)
        return self.classifier(roots)                                    # (B, A)


# ----------------------------------------------------------------------------- REINFORCE (Sec. 3.3)

def reinforce_loss(logits, tokens, advantage):
    """Surrogate whose gradient is REINFORCE's: -mean_b advantage_b * sum_t log p(token_bt), over the
    tokens up to and including each program's <END>. logits (B, T, V), tokens (B, T), advantage (B,)
    reward - baseline, no gradient."""
    log_p = Categorical(logits=logits).log_prob(tokens)                  # (B, T)
    # NOTE (deviation): tokens sampled after <END> are no actions; clevr-iep counted them too
    log_p = log_p.masked_fill(after_end(tokens), 0.0)                    # (B, T)
    return -(advantage.detach() * log_p.sum(1)).mean()


# ------------------------------------------------------------------------- the model and its stages (Sec. 4.1)

class PGEE(nn.Module):
    """The program generator and the execution engine, trained in the stage cfg.stage."""

    def __init__(self, cfg: PGEEConfig, info: dict):
        super().__init__()
        self.cfg = cfg
        self.idx_to_token = list(info["program_tokens"])
        self.pg = ProgramGenerator(cfg, info["num_words"], len(self.idx_to_token))
        self.ee = ExecutionEngine(cfg, info)
        self.register_buffer("baseline", torch.zeros(()))               # moving average of the reward
        # the trainer's hook: the lr schedule follows the stage's own val metric (the pg stage does not move
        # the answer accuracy, which its untrained EE gives)
        self.val_metric = "program_acc" if cfg.stage == "pg" else None

    def train_subset(self, n):
        """The trainer's hook: the pg stage learns from num_programs of the n training questions."""
        if self.cfg.stage != "pg" or not self.cfg.num_programs:
            return None
        if self.cfg.num_programs > n:
            raise data.DataError(f"--num-programs {self.cfg.num_programs}, but the training split has {n} questions")
        # a stream of its own: NumPy seeds default_rng(s) as default_rng([s, 0]), the trainer's first-epoch
        # order (data.Loader), which would then begin with these very questions (the joint stage too)
        rows = np.random.default_rng([self.cfg.program_seed, SUBSET_STREAM]).permutation(n)[:self.cfg.num_programs]
        return np.sort(rows)

    def execute(self, image, tokens):
        """Prefix token ids (B, P) (with or without <START>; read up to <END>) -> answer log-probs (B, A)."""
        return self.ee(image, topo_exec.decode(tokens, self.idx_to_token)).log_softmax(-1)

    def forward(self, batch):
        """batch: image (B, C, H, W), question (B, L), question_len (B,), program (B, P), answer (B,)
        -> {log_probs (B, A)} plus, by stage: loss (pg), aux_loss (joint), metrics {program_acc (B,)}."""
        image, program, stage = batch["image"], batch["program"], self.cfg.stage
        if stage == "ee":                                                # Sec. 4.1: EE on ground-truth programs
            return {"log_probs": self.execute(image, program)}
        enc = self.pg.encode(batch["question"], batch["question_len"])  # (B, D)
        if stage == "pg" and self.training:                              # Sec. 4.1: PG on ground-truth programs
            logits = self.pg.teacher_forced(enc, program)                # (B, P - 1, V)
            target = program[:, 1:]                                      # (B, P - 1)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=NULL)
            hit = ((logits.argmax(-1) == target) | (target == NULL)).all(1)  # (B,) every token right
            # no answers while the PG trains alone (the EE is not run): uniform log-probs, argmax <NULL>
            uniform = torch.full((len(image), self.ee.classifier[-1].out_features), -math.log(
                self.ee.classifier[-1].out_features), device=image.device)
            return {"log_probs": uniform, "loss": loss, "metrics": {"program_acc": hit.float()}}
        if not self.training:                                            # pg, joint: answer with greedy programs
            tokens, logits = self.pg.decode(enc, self.cfg.max_program_len, sample=False)
            out = {"log_probs": self.execute(image, tokens),
                   "metrics": {"program_acc": program_match(tokens, program).float()}}
            if stage == "pg":
                logits = self.pg.teacher_forced(enc, program)
                out["loss"] = F.cross_entropy(logits.flatten(0, 1), program[:, 1:].flatten(), ignore_index=NULL)
            return out
        # joint training (Sec. 3.3): EE on sampled programs by cross-entropy (the trainer's NLL), PG by REINFORCE
        tokens, logits = self.pg.decode(enc, self.cfg.max_program_len, sample=True)  # (B, T), (B, T, V)
        log_probs = self.execute(image, tokens)                          # (B, A)
        reward = (log_probs.argmax(1) == batch["answer"]).float()        # (B,) 1[correct]
        with torch.no_grad():                                            # clevr-iep: update, then centre
            mean = reward.mean()
            # torchrun: the mean over the global batch, so that every process keeps the same baseline
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(mean)
                mean /= torch.distributed.get_world_size()
            d = self.cfg.reward_decay
            self.baseline.mul_(d).add_((1 - d) * mean)
        return {"log_probs": log_probs, "aux_loss": reinforce_loss(logits, tokens, reward - self.baseline),
                "metrics": {"program_acc": program_match(tokens, program).float(), "reward": reward}}


Config, Model = PGEEConfig, PGEE  # names the trainer's registry looks for


if __name__ == "__main__":
    torch.manual_seed(0)
    tokens = ["<NULL>", "<START>", "<END>", "<UNK>", "scene", "filter_color[red]", "unique", "count",
              "query_shape", "exist", "union", "equal_integer"]
    info = dict(num_words=20, num_answers=7, program_tokens=tokens, image_kind="features", image_shape=(16, 6, 6))
    prefix = [["count", "union", "filter_color[red]", "scene", "scene"], ["query_shape", "unique", "scene"],
              ["equal_integer", "count", "scene", "count", "filter_color[red]", "scene"], ["exist", "scene"]]
    P = 2 + max(map(len, prefix))
    program = torch.tensor([[START, *map(tokens.index, p), END] + [NULL] * (P - 2 - len(p)) for p in prefix])
    lens = torch.tensor([9, 5, 3, 7])
    question = torch.randint(3, 20, (4, 9)) * (torch.arange(9) < lens[:, None])  # (B, L), 0-padded
    batch = dict(image=torch.randn(4, 16, 6, 6), question=question, question_len=lens, program=program,
                 answer=torch.randint(0, 7, (4,)))
    cfg = PGEEConfig(embed_dim=16, hidden_dim=32, module_dim=8, classifier_proj_dim=8, classifier_fc_dim=16)
    for stage in ("pg", "ee", "joint"):
        model = PGEE(PGEEConfig(**{**cfg.__dict__, "stage": stage}), info)
        out = model(batch)
        loss = out.get("loss", F.nll_loss(out["log_probs"], batch["answer"])) + out.get("aux_loss", 0.0)
        loss.backward()
        with torch.no_grad():
            ev = model.eval()(batch)
        print(f"{stage:>5}: log_probs {tuple(out['log_probs'].shape)}  loss {loss.item():.3f}  "
              f"eval program_acc {ev.get('metrics', {}).get('program_acc', torch.zeros(1)).mean():.2f}  "
              f"params {sum(p.numel() for p in model.parameters()):,}")
