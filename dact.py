"""DACT: Differentiable Adaptive Computation Time, around any model with the step protocol.

Paper: C. Eyzaguirre, A. Soto, "Differentiable Adaptive Computation Time for Visual Reasoning",
CVPR 2020, arXiv:2004.12770. Official code: ceyzaguirre4/DACT-MAC (PyTorch).

This file holds the DACT wrapper (Eqs. (1)-(4) for training, the halting rule of Eq. (9) for
inference, with halted examples really dropped from the batch), and a small command line to
evaluate, benchmark and plot trained runs:

    python train.py mac dact --tau 5e-3 --max-steps 12 --init runs/mac12/best.pt   # fine-tune, as the paper
    python dact.py eval  --init RUN/best.pt [--data DIR] [--halt mask]   # steps histogram, per family / kind
    python dact.py bench --init RUN/best.pt [--mac MAC_RUN/best.pt] [--json FILE]   # MAC vs compact vs mask
    python dact.py plot  RUN_DIR... [--out DIR]      # Figs. 3, 4, 6 in spirit (needs matplotlib)
    python dact.py                                   # smoke run on a toy step model

The wrapped model (see DESIGN.md) exposes encode(batch) -> ctx, init_state(ctx) -> state,
step(ctx, state, t) -> state, classify(ctx, state) -> logits, halt_input(ctx, state) -> (B, D),
max_steps, and the size D as `halt_dim` (or `cfg.dim`, as MAC). ctx and state are dicts (or
tuples) of tensors with the batch first.

Shapes:
    B  batch (b: the rows still running)   A  answers   D  size of halt_input
    N  maximum number of steps (n: the current step, 1-based as in the paper)
"""
import argparse
import dataclasses
import importlib
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

import data


@dataclass
class DACTConfig:
    tau: float = 5e-3  # Eq. (4) time penalty; paper grid 0, 1e-3, 5e-3, 1e-2, 5e-2 (official configs)
    halt: Literal["compact", "mask"] = "compact"  # inference: compact drops halted rows; mask keeps them (official)
    halt_max_steps: int = 0  # N, the most steps (0: the inner model's max_steps, i.e. MAC's --max-steps)


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
        return self.inner.classify(ctx, state).float().softmax(dim=-1)  # (b, A) y_n

    def halting(self, ctx, state):
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
        # official code: NLL on log(a_N clamped at 1e-8); Eq. (4): loss + tau * rho (the official code
        # also adds a constant 1 to rho, which changes no gradient: left out)
        return {"log_probs": a.clamp(min=1e-8).log(), "aux_loss": self.cfg.tau * rho.mean(),
                "steps": a.new_full((len(a),), self.max_steps)}

    def halting_steps(self, ctx, state):
        """Inference: stop each example at the first step n where Eq. (9) holds.
        compact: the halted rows leave ctx and state (one index op per tensor) and are never computed
        again. mask (official code): the whole batch runs every step; a halted row gets p := 0, which
        freezes its a_n (Eq. 2); the loop ends once every row has halted. Same predictions."""
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


Config, Model = DACTConfig, DACT  # names the trainer's registry looks for


# ----------------------------------------------------------------------------- loading and evaluating runs

def load_run(path, data_dir=None):
    """-> (model in eval mode with the EMA weights, checkpoint, data dir) for a train.py checkpoint of
    any model and wrapper. Modules are imported by the checkpoint's names (train.py's registry maps each
    name to the module of the same name), so this file imports no model itself."""
    try:
        ckpt = data.read_checkpoint(path)
        data_dir, info = data.checkpoint_data(ckpt, data_dir)
    except data.DataError as err:
        raise SystemExit(f"error: {err}")
    mod = importlib.import_module(ckpt["model_name"])
    model = mod.Model(data.checkpoint_config(mod.Config, ckpt["config"]["model"]), info)
    if ckpt["wrapper_name"]:
        wmod = importlib.import_module(ckpt["wrapper_name"])
        model = wmod.Model(model, data.checkpoint_config(wmod.Config, ckpt["config"]["wrapper"]))
    model.load_state_dict(ckpt["ema"])
    return model.eval(), ckpt, data_dir


def family_names(data_dir):
    """Names of the question families: the built-in mini-CLEVR's, GQA's detailed types (info.json);
    None for other data (indices only)."""
    d = Path(data_dir).resolve()
    if d in {(data.builtin_dir(tiny) / "prepared").resolve() for tiny in (False, True)}:
        return [f[0] for f in data.FAMILIES]
    info = d / "info.json"
    return json.loads(info.read_text()).get("family_names") if info.exists() else None


@torch.no_grad()
def evaluate(model, loader, device):
    """Accuracy, average steps, the steps histogram, average steps per question family and kind."""
    model.eval()
    cols = defaultdict(list)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch)
        steps = out.get("steps", torch.full_like(batch["answer"], model.max_steps))
        cols["hit"].append((out["log_probs"].argmax(1) == batch["answer"]).cpu())
        cols["steps"].append(steps.float().cpu())
        for k in ("answer", "family", "kind"):
            cols[k].append(batch[k].cpu())
    hit, steps, answer, family, kind = (torch.cat(cols[k]) for k in ("hit", "steps", "answer", "family", "kind"))
    known = answer != -100
    mean = lambda x: x.float().mean().item() if len(x) else None
    return {"acc": mean(hit[known]), "avg_steps": mean(steps), "n": len(hit),
            "steps_hist": torch.bincount(steps.long(), minlength=model.max_steps + 1)[1:].tolist(),  # steps 1..N
            "acc_by_kind": {k: mean(hit[known & (kind == i)]) for i, k in enumerate(data.QUESTION_KINDS)},
            "steps_by_kind": {k: mean(steps[kind == i]) for i, k in enumerate(data.QUESTION_KINDS)},
            "steps_by_family": {int(f): mean(steps[family == f]) for f in family.unique().tolist()}}


def show_eval(rec, names=None):
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines = [f"acc {pct(rec['acc'])}, average steps {rec['avg_steps']:.2f} ({rec['n']} questions)", "steps histogram:"]
    top = max(rec["steps_hist"]) or 1
    lines += [f"  {n:3d} {c:7d} {'#' * round(40 * c / top)}" for n, c in enumerate(rec["steps_hist"], 1)]
    lines += ["per kind: accuracy, average steps"]
    lines += [f"  {k:18s} {pct(rec['acc_by_kind'][k]):>6s} {s or 0:6.2f}" for k, s in rec["steps_by_kind"].items()]
    lines += ["per family (by average steps):"]
    for f, s in sorted(rec["steps_by_family"].items(), key=lambda kv: kv[1]):
        lines.append(f"  {f:3d} {names[f] if names and f < len(names) else '':22s} {s:6.2f}")
    return "\n".join(lines)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_eval(args):
    model, ckpt, data_dir = load_run(args.init, args.data)
    if args.halt:
        if ckpt["wrapper_name"] != "dact":
            raise SystemExit(f"error: --halt is for DACT runs; {args.init} has wrapper {ckpt['wrapper_name']}")
        model.cfg = dataclasses.replace(model.cfg, halt=args.halt)
    device = pick_device(args.device)
    rec = evaluate(model.to(device), data.make_loader(data_dir, "val", args.batch_size, shuffle=False), device)
    print(f"{args.init} ({ckpt['model_name']} {ckpt['wrapper_name'] or ''}) on {data_dir} val, {device}:")
    print(show_eval(rec, family_names(data_dir)))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


# ----------------------------------------------------------------------------- benchmark

@torch.inference_mode()
def time_model(model, batches, device, repeats):
    """-> (questions per second, best of `repeats` passes after one warm-up batch), accuracy, avg steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model(batches[0])
    best, n = math.inf, sum(len(b["answer"]) for b in batches)
    for _ in range(repeats):
        sync()
        t0, hits, steps = time.perf_counter(), 0, 0.0
        for b in batches:
            out = model(b)
            hits += (out["log_probs"].argmax(1) == b["answer"]).sum()
            steps += out["steps"].sum() if "steps" in out else model.max_steps * len(b["answer"])
        sync()
        best = min(best, time.perf_counter() - t0)
    return n / best, float(hits) / n, float(steps) / n


def cmd_bench(args):
    dact, ckpt, data_dir = load_run(args.init, args.data)
    if ckpt["wrapper_name"] != "dact":
        raise SystemExit(f"error: {args.init} is not a DACT run (wrapper {ckpt['wrapper_name']})")
    mac, mac_name = dact.inner, f"{ckpt['model_name']}, all {dact.inner.max_steps} steps (DACT's inner model)"
    if args.mac:
        mac, mac_ckpt, _ = load_run(args.mac, data_dir)
        mac_name = f"{mac_ckpt['model_name']}, all {mac.max_steps} steps ({args.mac})"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = list(data.make_loader(data_dir, "val", args.batch_size, shuffle=False))
    if args.limit:
        batches = batches[:max(1, -(-args.limit // args.batch_size))]
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    result = {"checkpoint": args.init, "mac": args.mac or None, "batch_size": args.batch_size, "threads":
              torch.get_num_threads(), "questions": sum(len(b["answer"]) for b in batches), "torch": torch.__version__,
              "max_steps": dact.max_steps, "devices": {}}
    print(f"inference on {result['questions']} val questions of {data_dir}, batch {args.batch_size}, "
          f"best of {args.repeats}, {result['threads']} CPU threads")
    for dev in devices:
        device = torch.device(dev)
        on = [{k: v.to(device) for k, v in b.items()} for b in batches]
        rows = []
        variants = [(mac_name, mac, None), ("DACT compact", dact, "compact"), ("DACT mask", dact, "mask")]
        for name, model, halt in variants:
            if halt:
                model.cfg = dataclasses.replace(model.cfg, halt=halt)
            qps, acc, steps = time_model(model.to(device).eval(), on, device, args.repeats)
            rows.append({"name": name, "questions_per_s": qps, "acc": acc, "avg_steps": steps})
        for r in rows:
            r["speedup_vs_mac"] = r["questions_per_s"] / rows[0]["questions_per_s"]
        result["devices"][dev] = rows
        print(f"{dev}:\n  {'':55s} {'q/s':>9s} {'x base':>6s} {'acc':>7s} {'steps':>6s}")
        for r in rows:
            print(f"  {r['name']:55s} {r['questions_per_s']:9.0f} {r['speedup_vs_mac']:6.2f} "
                  f"{100 * r['acc']:6.2f}% {r['avg_steps']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- figures

def run_summary(run_dir):
    """The best val record of a run: accuracy and average steps (a MAC's own step count if fixed)."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    if not val:
        raise SystemExit(f"error: {run_dir} has no val record yet")
    best = max(val, key=lambda r: r["acc"])
    wrapper, cfg = run["wrapper"], run["config"]
    steps = best.get("avg_steps") or cfg["model"].get("max_steps")
    label = (f"{wrapper.upper()} tau={cfg['wrapper']['tau']:g} ({run_dir.name})" if wrapper
             else f"{run['model'].upper()} {steps} steps ({run_dir.name})")
    return {"dir": str(run_dir), "wrapper": wrapper, "tau": wrapper and cfg["wrapper"]["tau"], "acc": best["acc"],
            "avg_steps": steps, "label": label}


def cmd_plot(args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: `python dact.py plot` draws with matplotlib, which is not installed: "
                         "pip install matplotlib (nothing else in this project needs it)")
    out = Path(args.out or args.runs[0])
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_summary(r) for r in args.runs]

    # Fig. 4: accuracy against average steps; DACT in colour, ACT as grey crosses, fixed MACs as diamonds
    fig, ax = plt.subplots(figsize=(6, 4.5))
    macs = sorted((r for r in runs if not r["wrapper"]), key=lambda r: r["avg_steps"])
    if macs:
        ax.plot([r["avg_steps"] for r in macs], [100 * r["acc"] for r in macs], "kD--", label="MAC, fixed steps")
        ax.axhline(100 * max(r["acc"] for r in macs), color="k", ls=":", lw=1)
    for r in runs:
        if r["wrapper"] == "dact":
            ax.scatter(r["avg_steps"], 100 * r["acc"], s=60, label=r["label"])
        elif r["wrapper"]:
            ax.scatter(r["avg_steps"], 100 * r["acc"], marker="x", color="gray", s=60, label=r["label"])
    ax.set(xlabel="average steps", ylabel="val accuracy (%)", title="accuracy vs computation (Fig. 4)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig4_acc_vs_steps.png", dpi=120)
    print(f"wrote {out / 'fig4_acc_vs_steps.png'}")

    # Fig. 3: average steps per question family of each adaptive run (RUN/eval.json, made once)
    adaptive = [r for r in runs if r["wrapper"]]
    for r in adaptive:
        cache = Path(r["dir"]) / "eval.json"
        if not cache.exists():
            model, _, data_dir = load_run(Path(r["dir"]) / "best.pt", args.data)
            rec = evaluate(model, data.make_loader(data_dir, "val", 256, shuffle=False), torch.device("cpu"))
            cache.write_text(json.dumps(dict(rec, data_dir=str(data_dir)), indent=1) + "\n")
        r["eval"] = json.loads(cache.read_text())
    if adaptive:
        fig, axes = plt.subplots(len(adaptive), 1, figsize=(10, 2.6 * len(adaptive)), squeeze=False)
        for ax, r in zip(axes[:, 0], adaptive):
            fam = sorted(r["eval"]["steps_by_family"].items(), key=lambda kv: kv[1])
            names = family_names(r["eval"]["data_dir"])
            ax.bar(range(len(fam)), [s for _, s in fam])
            ax.set_xticks(range(len(fam)), [names[int(f)] if names else f for f, _ in fam], rotation=70, fontsize=7)
            ax.set(ylabel="avg steps", title=f"{r['label']}: {100 * r['eval']['acc']:.1f}%, "
                                             f"{r['eval']['avg_steps']:.2f} steps (Fig. 3)")
        fig.tight_layout()
        fig.savefig(out / "fig3_steps_per_family.png", dpi=120)
        print(f"wrote {out / 'fig3_steps_per_family.png'}")

    # Fig. 6: per step, the image and question attention, the intermediate answer and p_n, for one question
    first = next((r for r in runs if r["wrapper"] == "dact"), None)
    if first:
        model, _, data_dir = load_run(Path(first["dir"]) / "best.pt", args.data)
        split = data.Split(data_dir, "val")
        batch = split.batch(np.array([args.question]))
        tr = {k: v[0] for k, v in model.trace(batch).items()}
        vocab = json.loads((data_dir / "vocab.json").read_text())
        words = {i: w for w, i in vocab["question_token_to_idx"].items()}
        answers = data.load_info(data_dir)["answers"]
        tokens = [words[int(i)] for i in batch["question"][0, :int(batch["question_len"][0])]]
        n_show = int(tr["halt_step"])
        fig = plt.figure(figsize=(2.2 * n_show + 1, 6.5))
        grid = fig.add_gridspec(3, n_show, height_ratios=[2, 1.5, 1.2])
        image = batch["image"][0]
        for n in range(n_show):
            ax = fig.add_subplot(grid[0, n])
            if "read_attn" in tr:
                K = tr["read_attn"].size(-1)
                s = math.isqrt(K)
                extent = (0, image.size(2), image.size(1), 0)
                if split.is_pixels:
                    ax.imshow(image.permute(1, 2, 0).numpy(), extent=extent)
                ax.imshow(tr["read_attn"][n].view(s, s).numpy(), cmap="jet", alpha=0.45, extent=extent)
            y_top = int(tr["y"][n].argmax())
            ax.set_title(f"step {n + 1}: {answers[y_top]} ({tr['y'][n, y_top]:.2f})\np_n {tr['p'][n]:.3f}", fontsize=8)
            ax.axis("off")
        if "control_attn" in tr:
            ax = fig.add_subplot(grid[1, :])
            ax.imshow(tr["control_attn"][:n_show, :len(tokens)].numpy(), cmap="Blues", aspect="auto")
            ax.set_xticks(range(len(tokens)), tokens, rotation=60, fontsize=7)
            ax.set_yticks(range(n_show), [f"step {n + 1}" for n in range(n_show)], fontsize=7)
        ax = fig.add_subplot(grid[2, :])
        final = int(tr["a"][n_show - 1].argmax())
        steps = range(1, model.max_steps + 1)
        ax.plot(steps, tr["p"].numpy(), "o-", label="p_n")
        ax.plot(steps, tr["a"][:, final].numpy(), "s-", label=f"a_n['{answers[final]}']")
        ax.plot(steps, tr["y"][:, final].numpy(), "^:", label=f"y_n['{answers[final]}']")
        ax.axvline(n_show, color="gray", ls=":")
        ax.set(xlabel="step n (dotted: halted by Eq. (9))", ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
        truth = answers[int(batch["answer"][0])] if int(batch["answer"][0]) >= 0 else "?"
        fig.suptitle(f"{' '.join(tokens[1:-1])}? answer {answers[final]} (true: {truth}) (Fig. 6)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"fig6_question{args.question}.png", dpi=120)
        print(f"wrote {out / f'fig6_question{args.question}.png'}")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(prog="dact.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    e = sub.add_parser("eval", help="accuracy, steps histogram, steps per family and kind on val")
    b = sub.add_parser("bench", help="inference throughput: MAC all steps vs DACT compact vs DACT mask")
    f = sub.add_parser("plot", help="figures from run directories (matplotlib)")
    for s in (e, b):
        s.add_argument("--init", required=True, help="a train.py checkpoint, e.g. RUN/best.pt")
    for s in (e, b, f):
        s.add_argument("--data", help="prepared data directory (default: the one the run was trained on)")
    e.add_argument("--halt", choices=("compact", "mask"), help="override the checkpoint's --halt")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the figures to this JSON file")
    b.add_argument("--mac", help="a fixed-step MAC checkpoint for the baseline row (default: DACT's inner model)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), help="default: cpu, and cuda if available")
    b.add_argument("--limit", type=int, default=0, help="time only the first LIMIT val questions (0: all)")
    b.add_argument("--repeats", type=int, default=3, help="report the fastest of this many passes")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    b.add_argument("--json", help="also write the figures to this JSON file")
    f.add_argument("runs", nargs="+", help="run directories (MAC, ACT and DACT runs)")
    f.add_argument("--out", help="where to write the figures (default: the first run directory)")
    f.add_argument("--question", type=int, default=0, help="val question index for Fig. 6")
    args = p.parse_args(argv)
    try:
        if args.cmd is None:
            return smoke()
        return {"eval": cmd_eval, "bench": cmd_bench, "plot": cmd_plot}[args.cmd](args)
    except data.DataError as err:
        raise SystemExit(f"error: {err}")


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
    main()
