"""Tools that read a trained run: accuracy and steps per question kind, family and step count; DACT's
figures; Stack-NMN's module weights and attention per step; LNMN's analysis of its learned cells.

    python analyze.py eval RUN [--data DIR] [--halt compact|mask] [--json FILE]   # steps histogram, per kind / family
    python analyze.py dact-plot RUN... [--out DIR] [--question N]   # DACT Figs. 3, 4, 6 in spirit (matplotlib)
    python analyze.py stack-figure RUN [--index N] [--out FILE]     # Stack-NMN (or LNMN): w(t) and the map per step
    python analyze.py lnmn RUN [--max-batches N] [--out DIR]        # LNMN Fig. 3, Tables 6, 7 and 2

RUN is a run directory of train.py (which stands for its best.pt) or a checkpoint file; every tool loads
it with `load_run`, which finds the model and wrapper modules through train.py's registries, and runs it
on the data it was trained on (or --data, with the same vocabulary). The one evaluation loop is
train.py's `evaluate`; `evaluate` here adds the breakdowns by question family and step count.
matplotlib is optional and imported only where a figure is drawn.
"""
import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch

import data
import train


# ------------------------------------------------------------------------------------------------
# Arguments checked before the work (bench.py uses these too)
# ------------------------------------------------------------------------------------------------

def check_least(values, least):
    """An error for any flag in `values` ({field: number or tuple of numbers}) under its least value in
    `least` ({field: least value})."""
    for name, low in least.items():
        given = values.get(name)
        for v in given if isinstance(given, (tuple, list)) else [given]:
            if v is not None and v < low:
                train.fail(f"--{name.replace('_', '-')} {v} is out of range: pass a number of at least {low}")


def writable(path, flag, folder=False):
    """`path` ready for what a command writes at its end: the folder (folder=True) or the file's folder
    made now, so that a bad --out or --json stops the command before its work, with a message."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        train.fail(f"{flag} {path} is a {'file' if folder else 'folder'}: pass a {'folder' if folder else 'file'} name")
    try:
        (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        train.fail(f"{flag} {path}: cannot make {'this' if folder else 'its'} folder ({e.strerror or e}); "
                   "pass another path")
    return path


def val_question(data_dir, index, flag):
    """The val split of `data_dir`, after checking that question `index` is in it."""
    split = data.Split(data_dir, "val")
    n = len(split.questions)
    if not 0 <= index < n:
        train.fail(f"{flag} {index} is out of range: the val split of {data_dir} has {n} questions"
                   + (f"; pass 0 to {n - 1}" if n else "; pass --data with val questions"))
    return split


# ------------------------------------------------------------------------------------------------
# Loading a run, evaluating it
# ------------------------------------------------------------------------------------------------

def registered(registry, name, kind, path):
    """The module train.py's registry names for `name`: a checkpoint never chooses what is imported."""
    if not isinstance(name, str) or name not in registry:
        train.fail(f"{path} holds a {kind} '{name}', which train.py does not know ({kind}s: {', '.join(registry)})")
    return importlib.import_module(registry[name])


def run_kind(ckpt):
    """A checkpoint's model and wrapper in words: "a 'mac' run in 'dact'", "a 'mac' run without a wrapper"."""
    wrapper = ckpt["wrapper_name"]
    return f"a '{ckpt['model_name']}' run " + (f"in '{wrapper}'" if wrapper else "without a wrapper")


def load_run(path, data_dir=None, models=(), inner=False):
    """-> (model in eval mode with the run's EMA weights, checkpoint, data dir, data info) for a train.py
    run directory (its best.pt) or checkpoint of any model and wrapper (or of one of `models`, else a
    clear error). inner: the model inside a wrapper (DACT around Stack-NMN gives the Stack-NMN)."""
    try:
        ckpt = data.read_checkpoint(path, models)
        data_dir, info = data.checkpoint_data(ckpt, data_dir)
    except data.DataError as err:
        train.fail(str(err))
    except (TypeError, AttributeError) as e:  # a field of the wrong type, e.g. a data_dir that is not a path
        train.fail(f"{path} is not a checkpoint train.py wrote ({type(e).__name__}: {str(e)[:200]}); pass another")
    mod = registered(train.MODELS, ckpt["model_name"], "model", path)
    wmod = ckpt["wrapper_name"] and registered(train.WRAPPERS, ckpt["wrapper_name"], "wrapper", path)
    try:
        model = mod.Model(data.checkpoint_config(mod.Config, ckpt["config"]["model"]), info)
        state, prefix = ckpt["ema"], ckpt.get("prefix", "")
        if wmod and not inner:
            model = wmod.Model(model, data.checkpoint_config(wmod.Config, ckpt["config"]["wrapper"]))
        elif prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:  # weights, config or its types
        train.fail(f"{path} does not fit the {ckpt['model_name']} model built from its own config "
                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); it was written by another version of "
                   f"the code or altered: use the version that wrote it, or pass another checkpoint")
    return model.eval(), ckpt, data_dir, info


def family_names(data_dir):
    """Names of the question families: the built-in mini-CLEVR's, GQA's detailed types (info.json);
    None for other data (indices only)."""
    d = Path(data_dir).resolve()
    if d in {(data.builtin_dir(tiny) / "prepared").resolve() for tiny in (False, True)}:
        import mini_clevr  # the generator's templates: imported when used
        return [f[0] for f in mini_clevr.FAMILIES]
    info = d / "info.json"
    return json.loads(info.read_text()).get("family_names") if info.exists() else None


def evaluate(model, loader, device):
    """train.evaluate (accuracy overall and per kind, loss, average steps), the steps histogram
    (1..max_steps), average steps per question kind and family, and accuracy and questions (with a
    known answer) per family. A model without a step count counts all its max_steps."""
    rec = train.evaluate(model, loader, device, contextlib.nullcontext(), per_question=True)
    q = rec.pop("questions")
    steps = q["steps"] if "steps" in q else torch.full(q["kind"].shape, float(model.max_steps))
    family, kind = q["family"], q["kind"]
    mean = lambda x: x.float().mean().item() if len(x) else None
    rec["avg_steps"] = mean(steps)
    rec["steps_hist"] = torch.bincount(steps.long(), minlength=model.max_steps + 1)[1:].tolist()  # steps 1..N
    rec["steps_by_kind"] = {k: mean(steps[kind == i]) for i, k in enumerate(data.QUESTION_KINDS)}
    families, hit, known = family.unique().tolist(), q["hit"], q["known"]
    rec["steps_by_family"] = {int(f): mean(steps[family == f]) for f in families}
    rec["acc_by_family"] = {int(f): mean(hit[(family == f) & known]) for f in families}
    rec["n_by_family"] = {int(f): int(((family == f) & known).sum()) for f in families}
    return rec


def show_eval(rec, names=None):
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines = [f"acc {pct(rec['acc'])}, average steps {rec['avg_steps']:.2f} ({rec['n']} questions)", "steps histogram:"]
    top = max(rec["steps_hist"]) or 1
    lines += [f"  {n:3d} {c:7d} {'#' * round(40 * c / top)}" for n, c in enumerate(rec["steps_hist"], 1)]
    lines += ["per kind: accuracy, average steps"]
    lines += [f"  {k:18s} {pct(rec['acc_by_kind'][k]):>6s} {s or 0:6.2f}" for k, s in rec["steps_by_kind"].items()]
    lines += ["per family (by average steps): accuracy, average steps"]
    for f, s in sorted(rec["steps_by_family"].items(), key=lambda kv: kv[1]):
        name = names[f] if names and f < len(names) else ""
        lines.append(f"  {f:3d} {name:22s} {pct(rec['acc_by_family'].get(f)):>6s} {s:6.2f}")
    return "\n".join(lines)


def cmd_eval(args):
    if args.json:
        writable(args.json, "--json")
    model, ckpt, data_dir, _ = load_run(args.run, args.data)
    if args.halt:
        if ckpt["wrapper_name"] != "dact":
            train.fail(f"--halt is for DACT runs; {args.run} is {run_kind(ckpt)}: drop --halt")
        model.cfg = dataclasses.replace(model.cfg, halt=args.halt)
    device = train.pick_device(args.device, 0)
    rec = evaluate(model.to(device), data.make_loader(data_dir, "val", args.batch_size, shuffle=False), device)
    print(f"{args.run} ({ckpt['model_name']} {ckpt['wrapper_name'] or ''}) on {data_dir} val, {device}:")
    print(show_eval(rec, family_names(data_dir)))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def pyplot():
    """matplotlib.pyplot with the file backend, or None if matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ------------------------------------------------------------------------------------------------
# DACT's figures (Eyzaguirre & Soto, CVPR 2020: Figs. 3, 4, 6)
# ------------------------------------------------------------------------------------------------

def run_summary(run_dir):
    """The best val record of a run: accuracy and average steps (a MAC's own step count if fixed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        train.fail(f"{run_dir} is not a run directory of train.py (no run.json): pass the folders that "
                   "`python train.py ... --out DIR` wrote")
    try:
        run = json.loads((run_dir / "run.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        val = [r for r in map(json.loads, lines) if r["split"] == "val"]
        if not val:
            train.fail(f"{run_dir} has no val record yet")
        best = max(val, key=lambda r: r["acc"])
        wrapper, cfg = run["wrapper"], run["config"]
        steps = best.get("avg_steps") or cfg["model"].get("max_steps")
        label = (f"{wrapper.upper()} tau={cfg['wrapper']['tau']:g} ({run_dir.name})" if wrapper
                 else f"{run['model'].upper()} {steps} steps ({run_dir.name})")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not train.py's records
        train.fail(f"{run_dir}: run.json or metrics.jsonl is not what train.py writes ({type(e).__name__}: "
                   f"{str(e)[:200]}); pass another run, or delete a last line cut short by a crash")
    return {"dir": str(run_dir), "wrapper": wrapper, "tau": wrapper and cfg["wrapper"]["tau"], "acc": best["acc"],
            "avg_steps": steps, "label": label}


def fig4(plt, runs, out):
    """Accuracy against average steps; DACT in colour, ACT as grey crosses, fixed MACs as diamonds."""
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


def fig3(plt, runs, out, data_dir):
    """Average steps per question family of each adaptive run (evaluated once into RUN/eval.json)."""
    adaptive = [r for r in runs if r["wrapper"]]
    for r in adaptive:
        cache = Path(r["dir"]) / "eval.json"
        if not cache.exists():
            model, _, d, _ = load_run(Path(r["dir"]) / "best.pt", data_dir)
            rec = evaluate(model, data.make_loader(d, "val", 256, shuffle=False), torch.device("cpu"))
            cache.write_text(json.dumps(dict(rec, data_dir=str(d)), indent=1) + "\n")
        r["eval"] = json.loads(cache.read_text())
    if not adaptive:
        return
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


def fig6(plt, run, out, question):
    """Per step, the image and question attention, the intermediate answer and p_n, for one question of
    the val split of a loaded run ({"model", "data_dir", "info", "split"})."""
    model, data_dir, info, split = run["model"], run["data_dir"], run["info"], run["split"]
    batch = split.batch(np.array([question]))
    tr = {k: v[0] for k, v in model.trace(batch).items()}
    vocab = json.loads((data_dir / "vocab.json").read_text())
    words = {i: w for w, i in vocab["question_token_to_idx"].items()}
    answers = info["answers"]
    tokens = [words[int(i)] for i in batch["question"][0, :int(batch["question_len"][0])]]
    n_show = int(tr["halt_step"])
    fig = plt.figure(figsize=(2.2 * n_show + 1, 6.5))
    grid = fig.add_gridspec(3, n_show, height_ratios=[2, 1.5, 1.2])
    image = batch["image"][0]
    for n in range(n_show):
        ax = fig.add_subplot(grid[0, n])
        if "read_attn" in tr:
            s = math.isqrt(tr["read_attn"].size(-1))
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
    fig.savefig(out / f"fig6_question{question}.png", dpi=120)
    print(f"wrote {out / f'fig6_question{question}.png'}")


def cmd_dact_plot(args):
    plt = pyplot() or train.fail("`python analyze.py dact-plot` draws with matplotlib, which is not installed: "
                                 "pip install matplotlib (nothing else in this project needs it)")
    runs = [run_summary(r) for r in args.runs]
    first = next((r for r in runs if r["wrapper"] == "dact"), None)
    if first:  # Fig. 6's run and question, checked before any figure is drawn
        model, _, d, info = load_run(Path(first["dir"]) / "best.pt", args.data)
        first = {"model": model, "data_dir": d, "info": info, "split": val_question(d, args.question, "--question")}
    out = writable(args.out or args.runs[0], "--out", folder=True)
    fig4(plt, runs, out)
    fig3(plt, runs, out, args.data)
    if first:
        fig6(plt, first, out, args.question)


# ------------------------------------------------------------------------------------------------
# Stack-NMN's figure (Hu et al., ECCV 2018: module weights and attention per step)
# ------------------------------------------------------------------------------------------------

def cmd_stack_figure(args):
    """Module weights per step and the map under the stack pointer per step, for one val question."""
    writable(args.out, "--out")
    model, _, d, info = load_run(args.run, args.data, models=("stack_nmn", "lnmn"), inner=True)
    batch = val_question(d, args.index, "--index").batch([args.index])
    with torch.no_grad():
        ctx, states = model.run(batch)
        pred = model.classify(ctx, states[-1]).argmax(-1).item()
    vocab = data.load_vocab(Path(d) / "vocab.json")["question_token_to_idx"]
    words = {i: w for w, i in vocab.items()}
    question = " ".join(words[i] for i in batch["question"][0].tolist() if i > data.UNK)
    w = torch.stack([s["module_logits"][0].softmax(-1) for s in states])   # (T, M)
    H, W = batch["image"].shape[-2:]
    maps = [s["attn"][0].softmax(-1).reshape(H, W) for s in states]
    print(f"{question}?  predicted {info['answers'][pred]}, answer {info['answers'][batch['answer'][0]]}")
    for t, row in enumerate(w):
        top = row.argsort(descending=True)[:3]
        print(f"step {t + 1}: " + ", ".join(f"{model.module_names[m]} {row[m]:.2f}" for m in top))
    plt = pyplot() or train.fail("the figure needs matplotlib: pip install matplotlib "
                                 "(the text above has the same numbers)")
    T = len(states)
    fig, ax = plt.subplots(2, T, figsize=(1.6 * T, 4.2), gridspec_kw={"height_ratios": [2, 1]})
    gs = ax[0, 0].get_gridspec()
    for a in ax[0]:
        a.remove()
    top = fig.add_subplot(gs[0, :])
    top.imshow(w.t().numpy(), cmap="viridis", aspect="auto", vmin=0, vmax=1)
    top.set_yticks(range(len(model.module_names)), model.module_names)
    top.set_xticks(range(T), [f"t={t + 1}" for t in range(T)])
    top.set_title(f"{question}? -> {info['answers'][pred]}", fontsize=9)
    for t in range(T):
        ax[1, t].imshow(maps[t].numpy(), cmap="gray")
        ax[1, t].set_axis_off()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


# ------------------------------------------------------------------------------------------------
# LNMN's analysis (Pahuja et al., 2019: Fig. 3, Tables 6, 7 and 2)
# ------------------------------------------------------------------------------------------------

def accuracy(model, loader, max_batches=0):
    """Overall and per-kind val accuracy (of the first max_batches batches, 0: all), on the CPU."""
    rec = train.evaluate(model, itertools.islice(loader, max_batches or None), torch.device("cpu"),
                         contextlib.nullcontext())
    return {"Overall": rec["acc"], **{k: a for k, a in rec["acc_by_kind"].items() if a is not None}}


def lnmn_accuracies(model, loader, ops, max_batches):
    """Val accuracy as trained, with hard-max alphas (Table 2), and without each operator (Table 7)."""
    bank = model.modules_
    rows = {"original": accuracy(model, loader, max_batches)}
    bank.hard = True
    rows["hard-max alphas (Table 2)"] = accuracy(model, loader, max_batches)
    bank.hard = False
    for i, op in enumerate(ops):                                         # Table 7: zero op i in every node
        bank.op_mask = torch.ones(len(ops)).index_fill_(0, torch.tensor([i]), 0.0)
        rows[f"without {op}"] = accuracy(model, loader, max_batches)
    bank.op_mask = None
    return rows


def cmd_lnmn(args):
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = writable(args.out or (run if run.is_dir() else run.parent), "--out", folder=True)
    model, _, d, _ = load_run(args.run, args.data, models=("lnmn",), inner=True)
    ops = registered(train.MODELS, "lnmn", "model", args.run).OPS
    bank = model.modules_
    alphas = {name: cell.alpha.detach().softmax(-1)                      # not a pooled cell's: unused
              for name, cell in zip(bank.names[1:], bank.cells) if not cell.pooled}
    print("softmax(alpha) per module and node (Fig. 3):")
    print(f"  {'':12s}" + "".join(f"{o:>9s}" for o in ops))
    for name, a in alphas.items():
        for k, row in enumerate(a):
            print(f"  {name + f' n{k + 1}':12s}" + "".join(f"{v:9.3f}" for v in row.tolist()))
    print("\nanalytical expressions from the argmax ops (Table 6):")
    exprs = {name: cell.expression() for name, cell in zip(bank.names[1:], bank.cells)}
    for name, e in exprs.items():
        print(f"  {name:8s} {e}")
    rows = lnmn_accuracies(model, data.make_loader(d, "val", 128, shuffle=False), ops, args.max_batches)
    cols = ["Overall", *[k for k in data.QUESTION_KINDS if k in rows["original"]]]
    print(f"\nval accuracy (%){f', first {args.max_batches} batches' if args.max_batches else ''} (Tables 7, 2):")
    print(f"  {'':28s}" + "".join(f"{c[:14]:>15s}" for c in cols))
    for name, r in rows.items():
        print(f"  {name:28s}" + "".join(f"{100 * r[c]:15.2f}" for c in cols))
    (out / "analysis.json").write_text(json.dumps(
        {"alphas": {k: v.tolist() for k, v in alphas.items()}, "expressions": exprs, "accuracy": rows}, indent=1))
    print(f"\nwrote {out / 'analysis.json'}")
    plt = pyplot()
    if plt is None:
        print("no matplotlib: the heat map (Fig. 3) is skipped (pip install matplotlib); the numbers are above")
        return
    fig, axes = plt.subplots(1, len(alphas), figsize=(2.2 * len(alphas), 2.2))
    for ax, (name, a) in zip(np.atleast_1d(axes), alphas.items()):
        ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(ops)), ops, rotation=90, fontsize=6)
        ax.set_yticks(range(len(a)), [f"node {k + 1}" for k in range(len(a))], fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "alphas.png", dpi=120)
    print(f"wrote {out / 'alphas.png'}")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(prog="analyze.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="accuracy, steps histogram, steps per kind and family on val (any run)")
    e.add_argument("run", help="a run directory of train.py (its best.pt) or a checkpoint")
    e.add_argument("--halt", choices=("compact", "mask"), help="override a DACT run's --halt")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    e.add_argument("--json", help="also write the figures to this JSON file")
    f = sub.add_parser("dact-plot", help="DACT Figs. 3, 4, 6 from run directories (matplotlib)")
    f.add_argument("runs", nargs="+", help="run directories (MAC, ACT and DACT runs)")
    f.add_argument("--out", help="where to write the figures (default: the first run directory)")
    f.add_argument("--question", type=int, default=0, help="val question index for Fig. 6")
    g = sub.add_parser("stack-figure", help="Stack-NMN / LNMN: module weights and attention per step, one question")
    g.add_argument("run", help="a Stack-NMN or LNMN run (or DACT around one)")
    g.add_argument("--index", type=int, default=0, help="val question")
    g.add_argument("--out", default="stack_nmn_figure.png")
    a = sub.add_parser("lnmn", help="LNMN: alpha heat map, expressions, operator ablation, hard-max accuracy")
    a.add_argument("run", help="an LNMN run")
    a.add_argument("--max-batches", type=int, default=0, help="evaluate on the first N val batches (0: all)")
    a.add_argument("--out", help="folder for analysis.json and alphas.png (default: the run's directory)")
    a.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    for s in (e, f, g, a):
        s.add_argument("--data", help="prepared data directory (default: the one the run was trained on)")
    return p


COMMANDS = {"eval": cmd_eval, "dact-plot": cmd_dact_plot, "stack-figure": cmd_stack_figure, "lnmn": cmd_lnmn}


LEAST = {"batch_size": 1, "max_batches": 0, "question": 0, "index": 0, "threads": 0}  # flag -> least value


def main(argv=None):
    args = parser().parse_args(argv)
    check_least(vars(args), LEAST)
    try:
        return COMMANDS[args.cmd](args)
    except data.DataError as err:
        train.fail(str(err))


if __name__ == "__main__":
    main()
