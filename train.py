"""The one trainer for every model: CLI, training loop, evaluation, EMA, checkpoints, resume, logs.

    python train.py -h                       # the models and wrappers
    python train.py mac -h                   # the common flags and MAC's flags, with their defaults
    python train.py mac                      # MAC on the built-in mini-CLEVR (laptop preset)
    python train.py mac --data DIR           # MAC on prepared CLEVR (the paper's sizes)
    python train.py mac dact --init runs/mac-X/best.pt --data DIR    # DACT on a pretrained MAC
    python train.py mac --out runs/mac-X --resume                     # continue a stopped run
    torchrun --nproc_per_node 8 train.py mac --data DIR               # distributed data parallel

A model module (mac.py, ...) exposes `Config` (a dataclass with the paper's defaults, one comment per
field), `Model(cfg, info)` whose `forward(batch)` returns {"log_probs": (B, A)} plus, where the model has
them, "aux_loss" (a scalar added to the loss) and "steps" (B,), and `PRESETS` {name: {field: value}}.
Optional too: "loss" (a scalar that replaces the answer NLL, e.g. a program generator's own loss),
"metrics" ({name: (B,) values in [0, 1]}, averaged like the accuracy and logged beside it), and a
method `train_subset(n) -> row indices or None`: the training questions to learn from, of the n.
Two more optional hooks: a model attribute `progress` is set to (iteration / iterations of --epochs)
before every training forward (schedules inside the loss, e.g. LNMN's entropy weight); and a method
`arch_optimizer() -> torch optimizer or None` (DARTS-style bilevel training, LNMN): its parameters are left out
of the trainer's optimizer and stepped by it after every weight update, on NLL + out["arch_loss"] of a
batch of the training rows that `train_subset` left out (drawn by (seed, iteration): exact on resume),
while any of them requires a gradient (LNMN's --arch-warmup turns that off for the start of a run).
A wrapper module (act.py, dact.py) exposes `Config` and `Model(inner_model, cfg)`. Every Config field
becomes a flag (`max_steps` -> `--max-steps`, bools as `--x/--no-x`), its comment becomes the help.

Where each setting comes from, lowest priority first:
    new run or --init:        Config defaults < preset < flags
    --resume or --eval-only:  the checkpoint's configs < flags
A preset key that is not a Config field sets the trainer (`lr`, `batch_size`, `epochs`, ...).
On --resume, RUN_FIELDS (e.g. --iters, --device) come from the command line, never the checkpoint.
"""
import argparse
import copy
import dataclasses
import datetime
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import types
import typing
from contextlib import nullcontext
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

import data

MODELS = {"mac": "mac", "stack_nmn": "stack_nmn", "lnmn": "lnmn", "pg_ee": "pg_ee"}  # name -> module
WRAPPERS = {"act": "act", "dact": "dact"}
KINDS = data.QUESTION_KINDS


@dataclasses.dataclass
class TrainConfig:
    data: str = ""  # prepared data directory (default: the built-in mini-CLEVR, made on first use)
    out: str = ""  # run directory (default: runs/MODEL[-WRAPPER]-TIMESTAMP)
    preset: str = "auto"  # auto: laptop on the built-in data, gqa on GQA, paper (= Config defaults) with other --data
    epochs: int = 25  # stanfordnlp/mac-network README: --epochs 25
    iters: int = 0  # stop after this many training iterations in all (0: no limit); for smoke runs
    batch_size: int = 64  # MAC paper
    lr: float = 1e-4  # MAC paper: Adam
    clip: float = 8.0  # MAC paper: gradient-norm clipping (0: off)
    ema: float = 0.999  # MAC paper: decay of the weight average used for evaluation (0: off)
    schedule: typing.Literal["plateau", "cosine"] = "plateau"  # plateau: ReduceLROnPlateau on val accuracy (MAC official code); cosine: to 0 by the last epoch
    lr_factor: float = 0.5  # ReduceLROnPlateau on val accuracy (MAC official code)
    lr_patience: int = 0  # epochs without a better val accuracy before the lr is cut (0: the first)
    seed: int = 0  # weights, dropout and shuffling
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default; small models run faster on 1)
    log_every: int = 100  # iterations between progress lines
    ckpt_every: int = 0  # also write last.pt every N iterations, inside an epoch (0: after each epoch only)
    amp: str = "off"  # autocast: bf16 (CUDA; CPU too), fp16 (CUDA, with a gradient scaler), or off
    compile: bool = False  # torch.compile the model
    resume: bool = False  # continue the run in --out from its last.pt
    init: str = ""  # start from this checkpoint's (EMA) weights; any config of the same model
    eval_only: bool = False  # evaluate the weights of --init or --resume on val, then exit


# Settings of this invocation only: on --resume they come from the command line, not the checkpoint.
RUN_FIELDS = {"out", "iters", "device", "threads", "log_every", "amp", "compile", "resume", "init",
              "eval_only"}


def fail(msg):
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------------
# Command line: flags generated from the Config dataclasses

def field_comments(cls):
    """The `# comment` on each field's line of a dataclass: the help text of its flag."""
    try:
        return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    except (OSError, TypeError):
        return {}


def add_flags(group, cls, part, presets=None, choices=None):
    """One flag per field of `cls`; default SUPPRESS, so the parsed namespace holds only given flags."""
    comments, hints = field_comments(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, kw = hints[f.name], {}
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in (tuple, list):  # tuple[int, ...], tuple[int, int], or a bare tuple: typed by its default
            kw["nargs"] = len(args) if args and Ellipsis not in args else "+"
            kw["type"] = args[0] if args else type(default[0]) if default else str
        elif origin is typing.Literal:
            kw["choices"], kw["type"] = args, type(args[0])
        else:
            kw["type"] = tp
        if choices and f.name in choices:
            kw["choices"] = choices[f.name]
        notes = [] if default in ("", None) else [f"default: {fmt(default)}"]
        notes += [f"{p}: {fmt(v[f.name])}" for p, v in (presets or {}).items() if f.name in v]
        text = comments.get(f.name, "") + (f" ({'; '.join(notes)})" if notes else "")
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"{part}.{f.name}", default=argparse.SUPPRESS,
                           metavar=None if "action" in kw or "choices" in kw else f.name.upper(),
                           help=text.replace("%", "%%"), **kw)


def fmt(v):
    return " ".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def import_part(kind, name, registry, parser):
    try:
        return importlib.import_module(registry[name])
    except ModuleNotFoundError as e:
        if e.name != registry[name]:
            raise  # the module exists but one of its imports is missing: show that
        parser.error(f"{kind} '{name}' is not implemented yet ({registry[name]}.py does not exist)")


def parse_args(argv):
    """-> (model name, wrapper name or None, model module, wrapper module, {part: {field: value}})."""
    avail = lambda reg: ", ".join(n + ("" if importlib.util.find_spec(m) else " (not implemented yet)")
                                  for n, m in reg.items())
    listing = (f"models:   {avail(MODELS)}\nwrappers: {avail(WRAPPERS)}\n"
               "run `python train.py MODEL -h` for the common flags and the model's flags")
    top = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], epilog=listing,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("model", choices=list(MODELS), help="the model to train")
    top.add_argument("wrapper", nargs="?", choices=list(WRAPPERS), help="adaptive computation around it")
    if not argv or argv[0].startswith("-") or argv[0] not in MODELS:
        top.parse_args(argv)  # prints the help, or the error, and exits
        top.error("put the model first: train.py MODEL [WRAPPER] [flags]")
    model_name = argv[0]
    model_mod = import_part("model", model_name, MODELS, top)
    wrapper_name = argv[1] if len(argv) > 1 and argv[1] in WRAPPERS else None
    wrapper_mod = wrapper_name and import_part("wrapper", wrapper_name, WRAPPERS, top)
    presets = getattr(model_mod, "PRESETS", {})

    p = argparse.ArgumentParser(prog="train.py", usage=f"train.py {model_name} [WRAPPER] [flags]",
                                description=(model_mod.__doc__ or "").split("\n")[0], allow_abbrev=False)
    p.add_argument("model", choices=list(MODELS), help="the model to train")
    p.add_argument("wrapper", nargs="?", choices=list(WRAPPERS), help="adaptive computation around it")
    add_flags(p.add_argument_group("trainer"), TrainConfig, "train", presets,
              {"preset": ["auto", "paper", *presets], "device": ["auto", "cpu", "cuda", "mps"],
               "amp": ["off", "bf16", "fp16"]})
    add_flags(p.add_argument_group(f"{model_name} ({model_mod.__name__}.Config)"), model_mod.Config, "model", presets)
    if wrapper_mod:
        add_flags(p.add_argument_group(f"{wrapper_name} ({wrapper_mod.__name__}.Config)"), wrapper_mod.Config,
                  "wrapper", getattr(wrapper_mod, "PRESETS", {}))
    ns, extra = p.parse_known_args(argv)
    if extra:
        p.error(f"put the wrapper right after the model: train.py {model_name} {extra[0]} [flags]"
                if extra[0] in WRAPPERS else f"unrecognized arguments: {' '.join(extra)}")
    ns = vars(ns)
    del ns["model"], ns["wrapper"]
    explicit = {"train": {}, "model": {}, "wrapper": {}}
    for key, value in ns.items():
        if "." in key:
            part, name = key.split(".", 1)
            explicit[part][name] = value
    return model_name, wrapper_name, model_mod, wrapper_mod, explicit


def with_values(cfg, values):
    """A copy of dataclass `cfg` with `values` (lists become tuples where the field holds a tuple)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if unknown := set(values) - names:
        fail(f"{type(cfg).__module__}.{type(cfg).__name__} has no field(s) {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(getattr(cfg, k), tuple) else v for k, v in values.items()}
    return dataclasses.replace(cfg, **values)


def apply_preset(name, cfgs, modules, explicit, log, why=None):
    """Apply preset `name` of the model (and wrapper) to cfgs {part: dataclass}, then the explicit flags."""
    changes = []
    for part, mod in modules.items():  # the model's preset, then the wrapper's
        preset = getattr(mod, "PRESETS", {}).get(name, {}) if name != "paper" else {}
        for key, value in preset.items():
            where = part if hasattr(cfgs[part], key) else "train"
            if not hasattr(cfgs[where], key):
                fail(f"preset '{name}' of {mod.__name__} sets '{key}', which is neither a Config nor a trainer field")
            paper = getattr(type(cfgs[where])(), key)  # the dataclass default, before any flag
            cfgs[where] = with_values(cfgs[where], {key: value})
            given = explicit[where].get(key)
            changes.append(f"{key}={fmt(value)} (paper {fmt(paper)})" if given is None else
                           f"{key}={fmt(given)} (flag; preset {fmt(value)}, paper {fmt(paper)})")
    for part in cfgs:
        if cfgs[part] is not None:
            cfgs[part] = with_values(cfgs[part], explicit[part])
    why = why or ("built-in data" if not cfgs["train"].data else "--data given")
    if changes:
        log(f"preset {name} ({why}): {', '.join(changes)}; pass --preset paper for the paper's sizes")
    else:
        log(f"preset {name} ({why}): the Config defaults (the paper's sizes)")
    return cfgs


# ----------------------------------------------------------------------------------------------------
# Runtime helpers

def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch.cuda.is_available() is False (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail("--device mps, but torch.backends.mps.is_available() is False (use --device cpu)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def seed_all(*keys):
    """Seed torch, numpy and random from a tuple of ints (e.g. (seed, epoch, rank))."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def rng_state():
    """All RNG states as tensors, lists and numbers (loadable with weights_only=True)."""
    npst = np.random.get_state()
    pyst = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [npst[0], npst[1].tolist(), *npst[2:]],
            "python": [pyst[0], list(pyst[1]), pyst[2]]}


def set_rng_state(st):
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    np.random.set_state((st["numpy"][0], np.array(st["numpy"][1], dtype=np.uint32), *st["numpy"][2:]))
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))


def save_checkpoint(path, ckpt, keep=None):
    """Atomic: write a temp file in the same folder, flush it to disk, then rename it over `path`.
    `keep` (e.g. "prev.pt"): the file that `path` held is kept under this name (a hard link: no copy),
    so a checkpoint damaged later has a good predecessor. `path` always exists once written: a crash,
    SIGKILL or failed write (disk full) at any point leaves the old `path` or the new one, never neither."""
    tmp = path.with_name(path.name + ".tmp")
    prev_tmp = keep and path.with_name(keep + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**ckpt, "digest": data.tensor_digest(ckpt)}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep and path.exists():
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, path.with_name(keep))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        for t in (tmp, prev_tmp):
            if t:
                t.unlink(missing_ok=True)
        fail(f"could not write checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             f"{path.name} still holds the previous checkpoint, if there was one. Free disk space (or pick "
             "another --out), then continue with --resume")


def read_checkpoint(path, model_name, hint=""):
    """The checkpoint at `path` (data.read_checkpoint), or a clear error if it is missing, damaged, or of
    another model."""
    try:
        return data.read_checkpoint(path, (model_name,), hint)
    except data.DataError as e:
        fail(str(e))


def load_weights(model, state, src_prefix, dst_prefix, log):
    """Load `state` into `model` non-strictly, and print every key that did not fit: never silently.
    The prefixes are where the inner model sits under a wrapper ("" without one), so MAC weights load
    into MAC-in-DACT and back."""
    state = {dst_prefix + k[len(src_prefix):] if k.startswith(src_prefix) else k: v for k, v in state.items()}
    own = model.state_dict()
    mismatched = {k: f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape}
    state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state, strict=False)
    log(f"loaded {len(state) - len(unexpected)} of {len(own)} tensors")
    log(f"  missing keys (keep their fresh init): {', '.join(k for k in missing if k not in mismatched) or 'none'}")
    log(f"  unexpected keys (ignored): {', '.join(unexpected) or 'none'}")
    log(f"  shape mismatches (keep their fresh init): {', '.join(mismatched.values()) or 'none'}")


def run_info(argv, cfgs, model_name, wrapper_name, data_dir, info):
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        git = "unknown"
    return {"argv": ["train.py", *argv], "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": model_name, "wrapper": wrapper_name,
            "config": {part: cfg and dataclasses.asdict(cfg) for part, cfg in cfgs.items()},
            "data_dir": str(data_dir), "vocab_hash": info["vocab_hash"], "git_commit": git,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "h5py": h5py.__version__}}


class Tally:
    """Sums of loss, right answers and questions, overall and per question kind (answer -100: unknown)."""

    def __init__(self):
        self.n, self.hits = torch.zeros(2, len(KINDS) + 1, dtype=torch.float64)  # last slot: kind -1
        self.loss, self.rows, self.steps, self.metrics = 0.0, 0, None, {}

    def add(self, out, batch, loss):
        answer, kind = batch["answer"], batch["kind"].clone()
        known = answer != -100
        kind[kind < 0] = len(KINDS)
        hit = ((out["log_probs"].argmax(1) == answer) & known).float()
        self.n += torch.bincount(kind[known], minlength=len(KINDS) + 1).cpu()
        self.hits += torch.bincount(kind, weights=hit, minlength=len(KINDS) + 1).cpu()
        self.loss += loss * known.sum().item()
        self.rows += len(answer)
        if "steps" in out:
            self.steps = (self.steps or 0.0) + out["steps"].float().sum().item()
        for k, v in out.get("metrics", {}).items():  # the model's own per-example metrics
            self.metrics[k] = self.metrics.get(k, 0.0) + v.float().sum().item()

    def reduce(self, device):
        """Sum the tallies of all processes of a distributed run (each must call it), so that every
        question counts once; a no-op in a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.cat([self.n, self.hits, torch.tensor([self.loss, self.rows, self.steps or 0.0,
                                                            self.steps is not None], dtype=torch.float64)])
            t = t.to(device)
            torch.distributed.all_reduce(t)
            t, k = t.cpu(), len(self.n)
            self.n, self.hits = t[:k], t[k:2 * k]
            self.loss, self.rows, steps, has_steps = t[2 * k:].tolist()
            self.rows, self.steps = int(self.rows), steps if has_steps else None
            if self.metrics:  # the model's own metrics: the same names on every process
                m = torch.tensor(list(self.metrics.values()), dtype=torch.float64, device=device)
                torch.distributed.all_reduce(m)
                self.metrics = dict(zip(self.metrics, m.cpu().tolist()))
        return self

    def summary(self):
        n = self.n.sum().item()
        rec = {"acc": self.hits.sum().item() / n if n else None, "loss": self.loss / n if n else None,
               "acc_by_kind": {k: (self.hits[i] / self.n[i]).item() if self.n[i] else None
                               for i, k in enumerate(KINDS)}, "n": int(n)}
        if self.steps is not None:
            rec["avg_steps"] = self.steps / self.rows
        if self.metrics:
            rec["metrics"] = {k: v / self.rows for k, v in self.metrics.items()}
        return rec


@torch.no_grad()
def evaluate(model, loader, device, autocast):
    model.eval()
    tally = Tally()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            out = model(batch)
        known = batch["answer"] != -100
        loss = F.nll_loss(out["log_probs"].float()[known], batch["answer"][known]).item() if known.any() else 0.0
        loss = out["loss"].item() if "loss" in out else loss
        tally.add(out, batch, loss)
    return tally.reduce(device).summary()  # a distributed run: each process evaluated its share of val


def all_ranks_mean(x):
    """The mean of scalar tensor `x` over the processes (NaN if it is NaN on any of them)."""
    x = x.detach().float().reshape(1).clone()
    torch.distributed.all_reduce(x)
    return x.item() / torch.distributed.get_world_size()


def show(rec):
    pct = lambda a: "-" if a is None else f"{100 * a:.1f}"
    kinds = ", ".join(f"{k} {pct(a)}" for k, a in rec["acc_by_kind"].items() if a is not None)  # none on GQA
    steps = f", avg steps {rec['avg_steps']:.2f}" if "avg_steps" in rec else ""
    steps += "".join(f", {k} {pct(v)}%" for k, v in rec.get("metrics", {}).items())
    return f"acc {pct(rec['acc'])}%{f' ({kinds})' if kinds else ''}, loss {rec['loss'] or 0:.4f}{steps}"


# ----------------------------------------------------------------------------------------------------
# The run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv, *parse_args(argv))
    except data.DataError as e:
        raise SystemExit(f"error: {e}")


def resolve_configs(model_name, wrapper_name, model_mod, wrapper_mod, explicit, log):
    """-> ({"train", "model", "wrapper": config}, checkpoint or None, its path): defaults < preset < flags
    for a new run or --init; the checkpoint's configs < flags for --resume and --eval-only."""
    cfg = with_values(TrainConfig(), explicit["train"])
    if cfg.eval_only and not (cfg.init or cfg.resume):
        fail("--eval-only needs the weights to evaluate: --init CKPT, or --resume --out RUN_DIR")
    if cfg.resume and not cfg.out:
        fail("--resume needs --out RUN_DIR, the run to continue")
    path = Path(cfg.out) / "last.pt" if cfg.resume else Path(cfg.init) if cfg.init else None
    if cfg.resume and not path.is_file():
        fail(f"no checkpoint at {path} to resume; drop --resume to start a new run")
    prev = path.with_name("prev.pt") if cfg.resume else None
    hint = (f". The checkpoint written before it is kept: `cp {prev} {path}`, then --resume again continues "
            "from there" if prev and prev.is_file() else "")
    ckpt = read_checkpoint(path, model_name, hint) if path else None
    cfgs = {"train": cfg, "model": model_mod.Config(), "wrapper": wrapper_mod.Config() if wrapper_mod else None}
    if not (cfg.resume or cfg.eval_only):
        preset, why = cfg.preset if cfg.preset != "auto" else "paper" if cfg.data else "laptop", None
        if cfg.preset == "auto" and cfg.data:  # a dataset with its own preset (GQA: 4 steps, 5 epochs)
            dataset = data.dataset_name(cfg.data)
            if dataset.lower() in getattr(model_mod, "PRESETS", {}):
                preset, why = dataset.lower(), f"--data is {dataset}"
        cfgs = apply_preset(preset, cfgs, {"model": model_mod, "wrapper": wrapper_mod}, explicit, log, why)
        cfgs["train"] = with_values(cfgs["train"], {"preset": preset})
        return cfgs, ckpt, path
    saved = ckpt["config"]
    for part, c in cfgs.items():
        if c is not None:
            keep = {k: v for k, v in (saved.get(part) or {}).items() if hasattr(c, k)}
            cfgs[part] = with_values(with_values(c, keep), explicit[part])
    cfgs["train"] = with_values(cfgs["train"], {k: getattr(cfg, k) for k in RUN_FIELDS})
    log(f"config from {path}, then the flags given")
    return cfgs, ckpt, path


def run(argv, model_name, wrapper_name, model_mod, wrapper_mod, explicit):
    # distributed only when launched by torchrun: each process reads its share of every batch (data.Loader)
    ddp = "RANK" in os.environ
    if ddp:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    log = print if rank == 0 else (lambda *a, **k: None)

    cfgs, ckpt, ckpt_path = resolve_configs(model_name, wrapper_name, model_mod, wrapper_mod, explicit, log)
    cfg, mcfg, wcfg = cfgs["train"], cfgs["model"], cfgs["wrapper"]
    name = model_name + (f"-{wrapper_name}" if wrapper_name else "")
    out = Path(cfg.out or f"runs/{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if not cfg.resume and not cfg.eval_only and (out / "last.pt").exists():
        fail(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    if cfg.resume and not cfg.eval_only and ckpt["wrapper_name"] != wrapper_name:
        fail(f"{ckpt_path} is a run of {model_name} with wrapper {ckpt['wrapper_name']}, not {wrapper_name}: "
             "resume it with the same model and wrapper")
    if cfg.batch_size % world:
        fail(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")

    # data
    data_dir = Path(cfg.data) if cfg.data else data.ensure_builtin(log=log)
    info = data.load_info(data_dir)
    if ckpt and ckpt["vocab_hash"] != info["vocab_hash"]:
        fail(f"checkpoint {ckpt_path} was trained on data with vocabulary {ckpt['vocab_hash']} "
             f"({ckpt.get('data_dir', '?')}), but {data_dir} has vocabulary {info['vocab_hash']}: word and "
             "answer indices would not match. Pass the --data it was trained on, or train from scratch")
    train_loader = data.make_loader(data_dir, "train", cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=ddp,
                                    rank=rank, world=world)
    val_loader = data.make_loader(data_dir, "val", cfg.batch_size, shuffle=False, rank=rank, world=world)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.amp == "fp16" and device.type != "cuda":
        fail(f"--amp fp16 needs CUDA (its gradient scaler); on {device.type} use --amp bf16 or --amp off")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # fp16 only: scales the loss

    # model (a wrapper holds the inner model under `prefix`), optimizer, scheduler, weights, EMA copy
    seed_all(cfg.seed)
    inner = model_mod.Model(mcfg, info)
    raw = wrapper_mod.Model(inner, wcfg) if wrapper_mod else inner
    prefix = next(n + "." for n, m in raw.named_modules() if m is inner) if raw is not inner else ""
    raw.to(device)
    arch_opt = inner.arch_optimizer() if hasattr(inner, "arch_optimizer") else None  # (see the docstring)
    arch_ids = {id(p) for g in arch_opt.param_groups for p in g["params"]} if arch_opt else set()
    optimizer = torch.optim.Adam([p for p in raw.parameters() if p.requires_grad and id(p) not in arch_ids], lr=cfg.lr)
    if (rows := getattr(inner, "train_subset", lambda n: None)(len(train_loader.split))) is not None:
        train_loader.rows = rows  # the model learns from these training questions only
        log(f"training on {len(rows)} of the {len(train_loader.split)} training questions")
    held_out = np.setdiff1d(np.arange(len(train_loader.split)), train_loader.rows if rows is not None else [])
    with_progress = [m for m in raw.modules() if hasattr(m, "progress")]
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                           patience=cfg.lr_patience)
    epoch, it, pos, best, rng = 0, 0, 0, -1.0, None
    resuming = cfg.resume and not cfg.eval_only
    if resuming:
        try:
            raw.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if arch_opt:
                arch_opt.load_state_dict(ckpt["arch_optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"{ckpt_path} does not fit the {name} model built from its own config ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:200]}); it was written by another version of the code. Start a new "
                 f"run with --init {ckpt_path}, which loads the weights that fit and lists the rest")
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "lr" in explicit["train"]:  # the optimizer's state holds the checkpoint's (maybe decayed) rate
            log(f"--lr {cfg.lr:g} replaces the checkpoint's {optimizer.param_groups[0]['lr']:g}")
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr
        epoch, it, pos, best, rng = ckpt["epoch"], ckpt["iter"], ckpt["pos"], ckpt["best_acc"], ckpt["rng"]
        if world > 1 and len(ckpt.get("rng_ranks") or []) == world:
            rng = ckpt["rng_ranks"][rank]  # each process continues its own dropout stream
        elif world != len(ckpt.get("rng_ranks") or [0]) and pos:
            log(f"note: {ckpt_path} was written by a run with another number of processes; the same batches "
                "follow, but dropout draws differ from an uninterrupted run until the epoch ends")
        log(f"resuming {ckpt_path}: epoch {epoch + 1}, batch {pos}, iteration {it}, best val acc {best:.4f}")
    elif ckpt:
        log(f"EMA weights from {ckpt_path} ({' + '.join(filter(None, (ckpt['model_name'], ckpt['wrapper_name'])))}):")
        load_weights(raw, ckpt["ema"], ckpt["prefix"], prefix, log)
    ema = copy.deepcopy(raw).requires_grad_(False)
    if resuming:
        ema.load_state_dict(ckpt["ema"])
    log(f"{name}: {sum(p.numel() for p in raw.parameters()):,} parameters on {device}")
    log(f"trainer: {cfg}\nmodel: {mcfg}" + (f"\nwrapper: {wcfg}" if wcfg else ""))

    if cfg.eval_only:
        rec = evaluate(raw, val_loader, device, autocast)
        log(f"val {show(rec)} ({rec['n']} questions)")
        return rec

    # run directory: the command line, full config, versions and git commit; then metrics and checkpoints
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        record = run_info(argv, cfgs, model_name, wrapper_name, data_dir, info)
        if resuming and (out / "run.json").exists():  # keep the first invocation, list the resumptions
            first = json.loads((out / "run.json").read_text())
            record = {**first, "resumed": first.get("resumed", []) + [record]}
        (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"run directory {out}")
    model = torch.compile(raw) if cfg.compile else raw
    if ddp:  # find_unused_parameters: PG+EE, DACT and others leave some parameters out of some batches
        model = torch.nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None,
                                                          find_unused_parameters=True)

    def write(rec):
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(rng, val_acc, is_best=False):
        """last.pt (the one before it kept as prev.pt) and, if is_best, best.pt; every rank's RNG state."""
        rngs = [rng] * world
        if ddp:
            torch.distributed.all_gather_object(rngs, rng)
        if rank == 0:
            state = {"model_name": model_name, "wrapper_name": wrapper_name, "prefix": prefix,
                     "config": {part: c and dataclasses.asdict(c) for part, c in cfgs.items()},
                     "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "arch_optimizer": arch_opt.state_dict() if arch_opt else None,
                     "iter": it, "pos": pos, "best_acc": best, "val_acc": val_acc, "rng": rng,
                     "rng_ranks": rngs if world > 1 else None, "vocab_hash": info["vocab_hash"],
                     "data_dir": str(data_dir)}
            save_checkpoint(out / "last.pt", state, keep="prev.pt")
            if is_best:
                save_checkpoint(out / "best.pt", state)

    n_batches = len(train_loader)
    total_iters = max(cfg.epochs * n_batches, 1)  # --schedule cosine: over --epochs (not --iters, a stop)
    train_time, train_questions, stop, last_val = 0.0, 0, bool(cfg.iters and it >= cfg.iters), None
    while epoch < cfg.epochs and not stop:
        train_loader.set_epoch(epoch, start=pos)
        batches = iter(train_loader)  # (making it may draw from the global RNG, so seed after it)
        if rng is not None and pos > 0:
            set_rng_state(rng)  # resumed mid-epoch: continue the RNG streams exactly where they were
        else:
            seed_all(cfg.seed, epoch, rank)  # epoch e's dropout is a function of (seed, e), like its order
        rng = None
        model.train()
        epoch_tally, tally, t0 = Tally(), Tally(), time.perf_counter()
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            questions = len(batch["answer"]) * world  # the global batch (this process read 1/world of it)
            for m in with_progress:
                m.progress = it / total_iters
            with autocast:
                out_ = model(batch)
                loss = out_["loss"] if "loss" in out_ else \
                    F.nll_loss(out_["log_probs"].float(), batch["answer"], ignore_index=-100)
                loss = loss + out_.get("aux_loss", 0.0)
            loss_value = loss.item()
            checked = all_ranks_mean(loss) if ddp else loss_value  # NaN on any process stops all of them
            if not math.isfinite(checked):  # before the update: the weights and last.pt stay good
                fail(f"the loss is {checked} at epoch {epoch + 1}, iteration {it + 1}; stopped before the "
                     f"update. The last good checkpoint is {out / 'last.pt'} (written after each epoch and every "
                     "--ckpt-every iterations); try a lower --lr or another --seed")
            if cfg.schedule == "cosine":  # a function of the iteration alone, so --resume needs no state
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(it / total_iters, 1.0)))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP averages the gradients over the processes here
            scaler.unscale_(optimizer)  # (the scaler is a no-op unless --amp fp16)
            gnorm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   cfg.clip if cfg.clip > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            arch_live = arch_opt and any(p.requires_grad for g in arch_opt.param_groups for p in g["params"])
            if arch_live and len(held_out):  # first-order DARTS: the architecture on a held-out batch
                idx = np.random.default_rng([cfg.seed, it]).choice(held_out, min(cfg.batch_size, len(held_out)), False)
                ab = {k: v.to(device) for k, v in train_loader.split.batch(np.sort(idx)[rank::world]).items()}
                with autocast:
                    oa = model(ab)
                    arch_loss = F.nll_loss(oa["log_probs"].float(), ab["answer"], ignore_index=-100) + oa["arch_loss"]
                arch_opt.zero_grad(set_to_none=True)
                arch_loss.backward()
                arch_opt.step()
            with torch.no_grad():  # EMA, with TF's num_updates warm-up so that short runs average trained weights
                decay = min(cfg.ema, (1 + it) / (10 + it))
                for e, p in zip(ema.parameters(), raw.parameters()):
                    e.lerp_(p, 1 - decay)
                for e, b in zip(ema.buffers(), raw.buffers()):
                    e.copy_(b)
            it, pos, train_questions = it + 1, pos + 1, train_questions + questions
            tally.add(out_, batch, loss_value)
            epoch_tally.add(out_, batch, loss_value)
            if it % cfg.log_every == 0:
                dt, s = time.perf_counter() - t0, tally.reduce(device).summary()
                train_time, t0 = train_time + dt, time.perf_counter()
                log(f"epoch {epoch + 1} iter {it} | loss {s['loss']:.4f} | acc {100 * (s['acc'] or 0):.1f}% | "
                    f"{tally.rows / dt:.0f} q/s | lr {optimizer.param_groups[0]['lr']:.2e} | "
                    f"grad norm {gnorm:.2f}"
                    + "".join(f" | {k} {100 * v:.1f}%" for k, v in s.get("metrics", {}).items()))
                tally = Tally()
            if cfg.iters and it >= cfg.iters:
                stop = True
                break
            if cfg.ckpt_every and it % cfg.ckpt_every == 0 and pos < n_batches:  # the epoch's end writes its own
                checkpoint(rng_state(), last_val)
        train_time += time.perf_counter() - t0

        # evaluate the EMA weights; the scheduler steps on whole epochs only; checkpoint
        rng = rng_state()  # taken before evaluation: a resumed run continues from here
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at (its last iteration's), logged below
        val = evaluate(ema, val_loader, device, autocast)
        if pos >= n_batches:
            if cfg.schedule == "plateau":
                scheduler.step(val["acc"])
            epoch, pos = epoch + 1, 0
        epoch_f = round(epoch + pos / n_batches, 4) if pos else epoch  # fractional after an --iters stop
        write({"split": "train", "epoch": epoch_f, "iter": it, **epoch_tally.reduce(device).summary(),
               "lr": lr, "questions_per_s": train_questions / max(train_time, 1e-9)})
        write({"split": "val", "epoch": epoch_f, "iter": it, **val})
        log(f"val after epoch {epoch_f} (iter {it}): {show(val)}")
        last_val, is_best, best = val["acc"], val["acc"] > best, max(best, val["acc"])
        checkpoint(rng, val["acc"], is_best)
        t0 = time.perf_counter()

    speed = train_questions / max(train_time, 1e-9)
    if last_val is None:
        log(f"nothing to train: {out} is at epoch {epoch} of {cfg.epochs}, iteration {it}")
    else:
        log(f"done: final val acc {100 * last_val:.2f}%, best {100 * best:.2f}%; average training "
            f"throughput {speed:.0f} questions/s ({train_questions} questions)")
    if ddp:
        torch.distributed.destroy_process_group()
    return {"final_acc": last_val, "best_acc": best, "questions_per_s": speed, "out": str(out)}


if __name__ == "__main__":
    main()
