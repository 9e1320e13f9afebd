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
them, "aux_loss" (a scalar added to the loss) and "steps" (B,), and `PRESETS` {name: {field: value}}, whose
"paper" preset is the model's full training recipe (every field of `Recipe` it needs, each with its source).
Optional too: "loss" (a scalar that replaces the answer NLL, e.g. a program generator's own loss),
"metrics" ({name: (B,) values in [0, 1]}, averaged like the accuracy and logged beside it), and a
method `train_subset(n) -> row indices or None`: the training questions to learn from, of the n.
Optional hooks, for a model's own training terms:
- attribute `progress`: set to (iteration / iterations of --epochs) before every training forward
  (schedules inside the loss, e.g. LNMN's entropy weight);
- `regularizer() -> scalar`: added to the loss of training steps only (Stack-NMN's weight decay);
- attribute `val_metric`: the name of one of its "metrics" that the plateau schedule follows instead of
  the answer accuracy (PG+EE's pg stage: program_acc);
- `arch_optimizer() -> torch optimizer or None` and `arch_step(forward, batch, optimizer, autocast)`
  (DARTS-style bilevel training, LNMN's Algorithm 2): the optimizer's parameters are left out of the
  trainer's optimizer; after every weight update the trainer draws a batch of the training rows that
  `train_subset` left out (by (seed, iteration): exact on resume) and the model takes its step on it,
  while any of those parameters requires a gradient (LNMN's --arch-warmup turns that off at the start).
A wrapper module (act.py, dact.py) exposes `Config` and `Model(inner_model, cfg)`; it wraps the models
with the step protocol (STEP_PROTOCOL) and no `arch_optimizer` (`wrappable`). Every Config field
becomes a flag (`max_steps` -> `--max-steps`, bools as `--x/--no-x`), its comment becomes the help.

The configs of a run: `TrainConfig` (the runtime: data, output, device, logging, AMP, ...), `Recipe` (the
training recipe: epochs, batch size, lr, clipping, EMA, schedule), the model's Config and the wrapper's.
Where each setting comes from, lowest priority first:
    new run:                  Config defaults < preset < flags; the recipe: the model's `paper` preset < the
                              wrapper's `paper` preset (DACT's epochs) < the model's and wrapper's preset < flags
    --init CKPT:              the trainer and the recipe as a new run; the model (and the wrapper, where CKPT has
                              the same one): Config defaults < CKPT's config < flags
    --resume or --eval-only:  the checkpoint's configs < flags (a checkpoint written before `Recipe` existed holds
                              the recipe in its train config)
A preset key that is not a Config field sets the recipe (`lr`, `batch_size`, `epochs`, ...) or the trainer
(`threads`).
On --resume, RUN_FIELDS (e.g. --iters, --device) come from the command line, never the checkpoint; --threads
comes from the checkpoint unless given, since the number of threads changes how CPU sums round.
Every value, wherever it came from, is checked against RULES. --init refuses a checkpoint whose tensors do
not all fit the model (other sizes, missing or extra keys; a new wrapper's own parameters, e.g. DACT's
halting unit, excepted) unless --init-partial is given; either way the log lists what loaded.

The run directory (--out): run.json (command line, configs, versions, git commit; written once, by the
first invocation), resumes.jsonl (the same record for each --resume), metrics.jsonl (a record per
evaluation), last.pt (prev.pt: the one it replaced), best.pt, and .lock, which the running train.py
holds locked (Linux, macOS): a second one on the same --out is refused. Checkpoints and run.json are
written atomically; a failed write (a full disk) stops the run with a message and leaves the file as it was.
An epoch ends with its records, then best.pt, then last.pt; a checkpoint inside an epoch holds the epoch's
sums so far. --resume drops the records after its checkpoint's iteration and continues those sums, so a run
killed at any moment and resumed ends as an uninterrupted run.
"""
import argparse
import copy
import dataclasses
import datetime
import importlib
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
from contextlib import nullcontext, suppress
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

import data

try:
    import fcntl  # the run directory's lock (Linux, macOS)
except ImportError:  # Windows: runs are not locked
    fcntl = None

MODELS = {"mac": "mac", "stack_nmn": "stack_nmn", "lnmn": "lnmn", "pg_ee": "pg_ee"}  # name -> module
WRAPPERS = {"act": "act", "dact": "dact"}
KINDS = data.QUESTION_KINDS


@dataclasses.dataclass
class TrainConfig:
    """The runtime of a run: data, output, seed, device, logging, checkpoints, AMP, compile, resume."""
    data: str = ""  # prepared data directory (default: the built-in mini-CLEVR, made on first use)
    out: str = ""  # run directory (default: runs/MODEL[-WRAPPER]-TIMESTAMP)
    preset: str = "auto"  # auto: laptop on the built-in data, gqa on GQA, paper (Config defaults, the model's training recipe) with other --data
    iters: int = 0  # stop after this many training iterations in all (0: no limit); for smoke runs
    seed: int = 0  # weights, dropout and shuffling
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default; small models run faster on 1); --resume keeps the run's
    log_every: int = 100  # iterations between progress lines
    ckpt_every: int = 0  # also write last.pt every N iterations, inside an epoch (0: after each epoch only)
    amp: str = "off"  # autocast: bf16 (CUDA; CPU too), fp16 (CUDA, with a gradient scaler), or off
    compile: bool = False  # torch.compile the model
    resume: bool = False  # continue the run in --out from its last.pt
    init: str = ""  # start from this checkpoint's (EMA) weights and its model's config (flags change it)
    init_partial: bool = False  # with --init: start the tensors that the checkpoint does not fit from a fresh init, instead of refusing
    eval_only: bool = False  # evaluate the weights of --init or --resume on val, then exit


@dataclasses.dataclass
class Recipe:
    """The training recipe. No model's values here: a run's recipe starts as its model's `paper` preset
    (paper_recipe), which names every field without a default; the plateau fields' defaults serve the
    recipes without a plateau schedule."""
    epochs: int  # passes over the training questions
    batch_size: int  # questions per optimizer step (all processes together)
    lr: float  # Adam's learning rate
    clip: float  # gradient-norm clipping (0: off)
    ema: float  # decay of the weight average used for evaluation (0: off)
    schedule: typing.Literal["plateau", "cosine", "constant"]  # plateau: ReduceLROnPlateau on the val accuracy (or the model's val_metric); cosine: to 0 by the last epoch; constant: no schedule
    lr_factor: float = 0.5  # plateau: the factor that cuts the lr
    lr_patience: int = 0  # plateau: epochs without a better val accuracy before the lr is cut (0: the first)
    lr_threshold: float = 1e-3  # plateau: the relative gain that counts as better
    kind_repeats: tuple[int, ...] = ()  # one count per question kind (Count, Exist, Compare Number, Query Attribute, Compare Attribute): an epoch sees each training question of that kind this many times (unset, or all 1: once each)
    repeat_epochs: int = 0  # the epochs, from the first, that --kind-repeats holds for (0: all); the later ones see each question once


# Settings of this invocation only: on --resume they come from the command line, not the checkpoint.
RUN_FIELDS = {"out", "iters", "device", "log_every", "amp", "compile", "resume", "init",
              "init_partial", "eval_only"}


# What a run directory holds (besides .lock): a new run refuses a folder with any of them.
RUN_FILES = ("last.pt", "best.pt", "prev.pt", "metrics.jsonl", "run.json", "resumes.jsonl")


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
PLATEAU_FIELDS = ("lr_factor", "lr_patience", "lr_threshold")


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
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = None if default is dataclasses.MISSING else default  # a field without a default (Recipe's)
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


STEP_PROTOCOL = ("encode", "init_state", "step", "classify", "halt_input")  # what ACT and DACT call (mac.py)


def wrappable(model_mod):
    """Whether ACT and DACT can wrap the model: it has the step protocol and no bilevel training of its own
    (LNMN's alpha step runs the model's own forward, which a wrapper replaces)."""
    return all(hasattr(model_mod.Model, a) for a in STEP_PROTOCOL) and not hasattr(model_mod.Model, "arch_optimizer")


def wrapped_models():
    return [m for m in MODELS if wrappable(importlib.import_module(MODELS[m]))]


def parse_args(argv):
    """-> (model name, wrapper name or None, model module, wrapper module, {part: {field: value}})."""
    if not argv or argv[0].startswith("-") or argv[0] not in MODELS:
        wraps = wrapped_models()
        listing = (f"models:   {', '.join(MODELS)}\nwrappers: {', '.join(WRAPPERS)} (around {', '.join(wraps)})\n"
                   "run `python train.py MODEL -h` for the common flags and the model's flags")
        top = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], epilog=listing,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        top.add_argument("model", choices=list(MODELS), help="the model to train")
        top.add_argument("wrapper", nargs="?", choices=list(WRAPPERS),
                         help=f"adaptive computation around {', '.join(wraps)}")
        top.parse_args(argv)  # prints the help, or the error, and exits
        top.error("put the model first: train.py MODEL [WRAPPER] [flags]")
    model_name = argv[0]
    model_mod = importlib.import_module(MODELS[model_name])
    wrapper_name = argv[1] if len(argv) > 1 and argv[1] in WRAPPERS else None
    if wrapper_name and not wrappable(model_mod):
        fail(f"{wrapper_name} cannot wrap {model_name}: a wrapper drives the step protocol "
             f"({', '.join(STEP_PROTOCOL)}) of a model without bilevel training of its own; it wraps "
             f"{', '.join(wrapped_models())}. Train {model_name} without a wrapper")
    wrapper_mod = wrapper_name and importlib.import_module(WRAPPERS[wrapper_name])
    presets = getattr(model_mod, "PRESETS", {})

    wraps = wrappable(model_mod)
    p = argparse.ArgumentParser(prog="train.py", usage=f"train.py {model_name}{' [WRAPPER]' * wraps} [flags]",
                                description=(model_mod.__doc__ or "").split("\n")[0], allow_abbrev=False)
    p.add_argument("model", choices=list(MODELS), help="the model to train")
    if wraps:
        p.add_argument("wrapper", nargs="?", choices=list(WRAPPERS), help="adaptive computation around it")
    wrapper_presets = getattr(wrapper_mod, "PRESETS", {}) if wrapper_mod else {}
    add_flags(p.add_argument_group("trainer"), TrainConfig, "train", presets,
              {"preset": list(dict.fromkeys(["auto", "paper", *presets])), "device": ["auto", "cpu", "cuda", "mps"],
               "amp": ["off", "bf16", "fp16"]})
    both = {k: {**presets.get(k, {}), **wrapper_presets.get(k, {})} for k in {**presets, **wrapper_presets}}
    add_flags(p.add_argument_group("recipe", "the model's paper preset, then the chosen preset, then these flags"),
              Recipe, "recipe", both)
    add_flags(p.add_argument_group(f"{model_name} ({model_mod.__name__}.Config)"), model_mod.Config, "model", presets)
    if wrapper_mod:
        add_flags(p.add_argument_group(f"{wrapper_name} ({wrapper_mod.__name__}.Config)"), wrapper_mod.Config,
                  "wrapper", wrapper_presets)
    ns, extra = p.parse_known_args(argv)
    if extra:
        p.error(f"put the wrapper right after the model: train.py {model_name} {extra[0]} [flags]"
                if extra[0] in WRAPPERS and wraps else f"unrecognized arguments: {' '.join(extra)}")
    ns = vars(ns)
    del ns["model"]
    ns.pop("wrapper", None)
    explicit = {"train": {}, "recipe": {}, "model": {}, "wrapper": {}}
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
    values = {k: tuple(v) if isinstance(getattr(cfg, k), tuple) and isinstance(v, (list, tuple)) else v
              for k, v in values.items()}
    return dataclasses.replace(cfg, **values)


# What a setting must hold, wherever it comes from (a flag, a preset, a checkpoint's config): a rule applies
# to every config (trainer, recipe, model, wrapper) that has the field. Beyond these, every value must have its
# field's type, a float must be finite and an int >= 0.
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
BELOW_1 = (lambda v: 0 <= v < 1, ">= 0 and < 1")
FROM_0_TO_1 = (lambda v: 0 <= v <= 1, "from 0 to 1")
RULES = {
    **dict.fromkeys(("batch_size", "log_every", "embed_dim", "max_steps", "kb_dim", "pe_dim", "mem_dim", "out_dim",
                     "stack_len", "map_dim", "hidden_dim", "rnn_layers", "max_program_len", "module_dim",
                     "classifier_proj_dim", "classifier_fc_dim"), AT_LEAST_1),
    "dim": (lambda v: v >= 2 and v % 2 == 0, ">= 2 and even (the BiLSTM gives dim / 2 per direction)"),
    "pixel_channels": (lambda v: len(v) > 0 and min(v) >= 1, "(one or more, each >= 1)"),
    "kind_repeats": (lambda v: v == () or (len(v) == len(data.QUESTION_KINDS) and min(v) >= 1),
                     f"(none, or {len(data.QUESTION_KINDS)}: one per question kind, each >= 1)"),
    **dict.fromkeys(("lr", "arch_lr", "sharpen_temp"), (lambda v: v > 0, "> 0")),
    **dict.fromkeys(("lr_factor", "halt_eps"), (lambda v: 0 < v < 1, "between 0 and 1 (both excluded)")),
    **dict.fromkeys(("ema", "held_out", "stem_dropout", "question_dropout", "memory_dropout", "output_dropout",
                     "read_dropout", "lr_threshold"), BELOW_1),
    **dict.fromkeys(("entropy_begin", "entropy_end", "entropy_switch", "arch_warmup", "reward_decay"), FROM_0_TO_1),
    **dict.fromkeys(("clip", "tau", "weight_decay", "arch_wd", "alpha_init_std"), (lambda v: v >= 0, ">= 0")),
}


def type_fits(value, tp):
    """(whether `value` fits a Config field of type `tp`, what that type asks for)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]: None or an X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None:
            return True, ""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in args and type(value) is type(args[0]), f"one of {', '.join(map(str, args))}"
    if origin in (tuple, list):
        item = args[0] if args else int
        return isinstance(value, tuple) and all(type_fits(v, item)[0] for v in value), f"a list of {item.__name__}s"
    if tp is bool:
        return isinstance(value, bool), "true or false"
    if tp is int:
        return number and isinstance(value, int), "an integer"
    if tp is float:
        return number and math.isfinite(value), "a finite number"
    return isinstance(value, tp), f"a {tp.__name__}"


def check_configs(cfgs, explicit, saved, path):
    """Every value of every config against its type and RULES. The error names where the value came from:
    a flag, the checkpoint `path` (`saved`: {part: the config values taken from it}), or a preset."""
    for part, cfg in cfgs.items():
        hints = typing.get_type_hints(type(cfg)) if cfg is not None else {}
        for name, tp in hints.items():
            value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
            fits, need = type_fits(value, tp)
            test, bound = RULES.get(name, (lambda v: v >= 0, ">= 0") if tp is int else (lambda v: True, ""))
            if fits and test(value):
                continue
            need += f" {bound}" if bound else ""
            if name in explicit[part]:
                fail(f"{flag} {fmt(value)}: {name} must be {need}")
            if name in (saved.get(part) or {}):
                fail(f"checkpoint {path} sets {name} = {value!r} in its {part} config, but {name} must be {need}: "
                     f"pass {flag} with a good value (the file was edited, or written by another version of the code)")
            fail(f"{type(cfg).__name__}.{name} = {value!r} (its default or a preset), but {name} must be {need}")


def repeat_kinds(split, rows, repeats, log):
    """The training rows (None: all) with each question of kind k repeated repeats[k] times (oversampling)."""
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    kinds = split.kinds[rows]
    if missing := [data.QUESTION_KINDS[k] for k, r in enumerate(repeats) if r > 1 and not (kinds == k).any()]:
        fail(f"--kind-repeats {' '.join(map(str, repeats))}: the training questions have no {', '.join(missing)} "
             "question (their kinds come from the programs): repeat only kinds the data has")
    extra = [rows[kinds == k] for k, r in enumerate(repeats) for _ in range(r - 1)]
    log(f"an epoch: {len(rows)} training questions and {sum(map(len, extra))} repeats "
        f"({', '.join(f'{data.QUESTION_KINDS[k]} x{r}' for k, r in enumerate(repeats) if r != 1) or 'none'})")
    return np.concatenate([rows, *extra])


def paper_recipe(model_mod, wrapper_mod=None):
    """A run's base recipe: the recipe fields of the model's `paper` preset, then of the wrapper's (DACT's
    epochs). The model's names every Recipe field without a default, and the plateau fields too where its
    schedule is the plateau: a missing one fails here, never falls back on another model's value."""
    paper = getattr(model_mod, "PRESETS", {}).get("paper", {})
    need = [f.name for f in dataclasses.fields(Recipe)
            if f.default is dataclasses.MISSING or (f.name in PLATEAU_FIELDS and paper.get("schedule") == "plateau")]
    if missing := [name for name in need if name not in paper]:
        fail(f"{model_mod.__name__}.PRESETS['paper'] does not set {', '.join(missing)}: a model's paper preset "
             f"states its whole training recipe ({', '.join(need)}), each with its source")
    wrapper_paper = getattr(wrapper_mod, "PRESETS", {}).get("paper", {}) if wrapper_mod else {}
    return Recipe(**{k: v for p in (paper, wrapper_paper) for k, v in p.items() if k in RECIPE_FIELDS})


def apply_preset(name, cfgs, modules, explicit, log, why=None, keep=()):
    """Apply preset `name` of the model (and wrapper) to cfgs {part: dataclass}, then the explicit flags.
    cfgs["recipe"] comes in as the paper recipe (paper_recipe): a preset changes the recipe fields it names.
    The parts in `keep` (those --init took from its checkpoint) take no preset values."""
    changes, base_recipe = [], cfgs["recipe"]
    for part, mod in modules.items():  # the model's preset, then the wrapper's
        preset = getattr(mod, "PRESETS", {}).get(name, {})  # paper: the training recipe, the sizes are the Config's
        for key, value in preset.items():
            where = next((p for p in (part, "recipe", "train") if hasattr(cfgs[p], key)), None)
            if where is None:
                fail(f"preset '{name}' of {mod.__name__} sets '{key}', which is neither a Config, a recipe nor a "
                     "trainer field")
            if where in keep:
                continue
            paper = getattr(base_recipe if where == "recipe" else type(cfgs[where])(), key)  # before any flag
            cfgs[where] = with_values(cfgs[where], {key: value})
            given = explicit[where].get(key)
            if given is not None or fmt(value) != fmt(paper):  # a value a preset states as the paper's is no change
                changes.append(f"{key}={fmt(value)} (paper {fmt(paper)})" if given is None else
                               f"{key}={fmt(given)} (flag; preset {fmt(value)}, paper {fmt(paper)})")
    for part in cfgs:
        if cfgs[part] is not None:
            cfgs[part] = with_values(cfgs[part], explicit[part])
    why = why or ("built-in data" if not cfgs["train"].data else "--data given")
    if name == "paper":
        recipe = ", ".join(f"{f}={fmt(getattr(cfgs['recipe'], f))}" for f in RECIPE_FIELDS)
        log(f"preset paper ({why}): the Config defaults (the paper's sizes) and the training recipe {recipe}")
    elif changes:
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


def can_compile(device, log):
    """Whether torch.compile can build this device's kernels: on the CPU, Inductor compiles C++, so without a
    C++ compiler on the PATH the run goes on uncompiled (same results, slower) instead of failing at its first step."""
    if device.type != "cpu" or any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return True
    log("--compile: no C++ compiler (g++, clang++ or cl) on the PATH for torch.compile on the CPU; running uncompiled")
    return False


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


def write_atomic(path, write, keep=None):
    """Atomic: write(f) into a temp file in the same folder, flush it to disk, then rename it over `path`.
    `keep` (e.g. "prev.pt"): the file that `path` held is kept under this name (a hard link: no copy),
    so a checkpoint damaged later has a good predecessor. `path` always exists once written: a crash,
    SIGKILL or failed write (disk full) at any point leaves the old `path` or the new one, never neither.
    A failed write removes its temp files and raises (OSError; torch.save's RuntimeError)."""
    tmp = path.with_name(path.name + ".tmp")
    prev_tmp = keep and path.with_name(keep + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
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
    except (OSError, RuntimeError):
        for t in (tmp, prev_tmp):
            if t:
                t.unlink(missing_ok=True)
        raise


def save_checkpoint(path, ckpt, keep=None):
    """torch.save `ckpt` with its tensors' digest to `path`, atomically (write_atomic)."""
    try:
        write_atomic(path, lambda f: torch.save({**ckpt, "digest": data.tensor_digest(ckpt)}, f), keep)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        fail(f"could not write checkpoint {path} ({data.first_line(e)}); {path.name} still holds the previous checkpoint, "
             "if there was one. Free disk space (or pick another --out), then continue with --resume")


def append_line(path, rec, advice):
    """Append `rec` to the JSON-lines file `path`; a failed write (a full disk) cuts the file back to what it
    held and stops with a message that ends with `advice`."""
    size = path.stat().st_size if path.exists() else None
    try:
        with open(path, "ab") as f:
            f.write((json.dumps(rec) + "\n").encode())
    except OSError as e:
        with suppress(OSError):
            os.truncate(path, size) if size is not None else path.unlink()
        fail(f"could not write {path} ({data.first_line(e)}); {advice}")


def read_checkpoint(path, model_name, hint=""):
    """The checkpoint at `path` (data.read_checkpoint), or a clear error if it is missing, damaged, or of
    another model."""
    try:
        return data.read_checkpoint(path, (model_name,), hint)
    except data.DataError as e:
        fail(str(e))


def load_weights(model, state, src_prefix, dst_prefix, log, same_wrapper=True):
    """Load `state` into `model` non-strictly, and print every key that did not fit: never silently.
    The prefixes are where the inner model sits under a wrapper ("" without one), so MAC weights load
    into MAC-in-DACT and back. -> the keys that did not fit, less a wrapper's own keys where the checkpoint
    has another wrapper or none (`same_wrapper` False): a new halting unit starts fresh, an old one is left out."""
    own_wrapper = {k for k in state if not k.startswith(src_prefix)}  # the checkpoint's wrapper's keys
    state = {dst_prefix + k[len(src_prefix):] if k.startswith(src_prefix) else k: v for k, v in state.items()}
    own = model.state_dict()
    mismatched = {k: f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape}
    state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in mismatched]
    log(f"loaded {len(state) - len(unexpected)} of {len(own)} tensors")
    log(f"  missing keys (keep their fresh init): {', '.join(missing) or 'none'}")
    log(f"  unexpected keys (ignored): {', '.join(unexpected) or 'none'}")
    log(f"  shape mismatches (keep their fresh init): {', '.join(mismatched.values()) or 'none'}")
    if not same_wrapper:
        missing = [k for k in missing if k.startswith(dst_prefix)]
        unexpected = [k for k in unexpected if k not in own_wrapper]
    return [*mismatched.values(), *missing, *unexpected]


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
    """Sums of loss, right answers and questions, overall and per question kind (answer -100: unknown).
    per_question: also keep each question's family, kind, hit, known and steps, returned by summary() as
    "questions" (analyze.py's breakdowns by family and step count)."""

    def __init__(self, per_question=False):
        self.n, self.hits = torch.zeros(2, len(KINDS) + 1, dtype=torch.float64)  # last slot: kind -1
        self.loss, self.rows, self.steps, self.metrics = 0.0, 0, None, {}
        self.questions = {} if per_question else None

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
        if self.questions is not None:
            steps = {"steps": out["steps"].float()} if "steps" in out else {}
            for k, v in {"family": batch["family"], "kind": batch["kind"], "hit": hit, "known": known, **steps}.items():
                self.questions.setdefault(k, []).append(v.cpu())

    def state(self):
        """The sums as tensors and numbers, for a checkpoint (loadable with weights_only=True)."""
        return {"n": self.n.clone(), "hits": self.hits.clone(), "loss": self.loss, "rows": self.rows,
                "steps": self.steps, "metrics": dict(self.metrics)}

    @classmethod
    def from_state(cls, st):
        t = cls()
        t.n, t.hits, t.metrics = st["n"].clone(), st["hits"].clone(), dict(st["metrics"])
        t.loss, t.rows, t.steps = st["loss"], st["rows"], st["steps"]
        return t

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
        if self.questions is not None:
            rec["questions"] = {k: torch.cat(v) for k, v in self.questions.items()}
        return rec


@torch.no_grad()
def evaluate(model, loader, device, autocast, per_question=False):
    model.eval()
    tally = Tally(per_question)
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
    """-> ({"train", "recipe", "model", "wrapper": config}, checkpoint or None, its path): defaults (the recipe:
    the paper recipe) < preset < flags for a new run or --init; the checkpoint's configs < flags for --resume
    and --eval-only."""
    if explicit["train"].get("data"):  # stored absolute: checkpoints and run.json work from any folder
        explicit = {**explicit, "train": {**explicit["train"], "data": os.path.abspath(explicit["train"]["data"])}}
    cfg = with_values(TrainConfig(), explicit["train"])
    if cfg.eval_only and not (cfg.init or cfg.resume):
        fail("--eval-only needs the weights to evaluate: --init CKPT, or --resume --out RUN_DIR")
    if cfg.resume and not cfg.out:
        fail("--resume needs --out RUN_DIR, the run to continue")
    if cfg.resume and cfg.init:
        fail("--init and --resume together: --resume continues the run in --out from its last.pt (weights, optimizer, "
             "counters); --init starts a new run from a checkpoint's weights. Pass one of them")
    path = Path(cfg.out) / "last.pt" if cfg.resume else Path(cfg.init) if cfg.init else None
    if cfg.resume and not path.is_file():
        fail(f"no checkpoint at {path} to resume; drop --resume to start a new run")
    try:
        ckpt = path and data.read_checkpoint(path, (model_name,))
    except data.DataError:  # read again, for the message with what to do
        ckpt = read_checkpoint(path, model_name, resume_hint(path) if cfg.resume else "")
    cfgs = {"train": cfg, "recipe": paper_recipe(model_mod, wrapper_mod), "model": model_mod.Config(),
            "wrapper": wrapper_mod.Config() if wrapper_mod else None}
    if not (cfg.resume or cfg.eval_only):
        preset, why = cfg.preset if cfg.preset != "auto" else "paper" if cfg.data else "laptop", None
        if cfg.preset == "auto" and cfg.data:  # a dataset with its own preset (GQA: 4 steps, 5 epochs)
            dataset = data.dataset_name(cfg.data)
            if dataset.lower() in getattr(model_mod, "PRESETS", {}):
                preset, why = dataset.lower(), f"--data is {dataset}"
        same = ["wrapper"] if ckpt and wrapper_mod and ckpt["wrapper_name"] == wrapper_name else []
        taken = {p: saved_config(ckpt, p, cfgs[p], path) for p in ["model", *same]} if ckpt else {}
        for part, values in taken.items():  # --init: the model (and wrapper) the checkpoint holds
            cfgs[part] = with_values(cfgs[part], values)
        cfgs = apply_preset(preset, cfgs, {"model": model_mod, "wrapper": wrapper_mod}, explicit, log, why, taken)
        cfgs["train"] = with_values(cfgs["train"], {"preset": preset})
        if taken:
            log(f"{' and '.join(taken)} config from {path}, then the flags given")
        check_configs(cfgs, explicit, taken, path)
        return cfgs, ckpt, path
    saved = {part: saved_config(ckpt, part, c, path) for part, c in cfgs.items() if c is not None}
    for part in saved:
        cfgs[part] = with_values(with_values(cfgs[part], saved[part]), explicit[part])
    cfgs["train"] = with_values(cfgs["train"], {k: getattr(cfg, k) for k in RUN_FIELDS})
    log(f"config from {path}, then the flags given")
    check_configs(cfgs, explicit, saved, path)
    return cfgs, ckpt, path


def resume_hint(path):
    """What to do when the last.pt to resume is damaged: put prev.pt back, unless prev.pt is damaged too."""
    prev, best = path.with_name("prev.pt"), path.with_name("best.pt")
    if not prev.is_file():
        return ""
    try:
        data.read_checkpoint(prev)
    except data.DataError:
        return (f". {prev}, the checkpoint before it, is damaged too: the run cannot continue from its checkpoints. "
                "Start a new run in another --out" + (f", with --init {best} for its best weights (if that file "
                                                      "reads)" if best.is_file() else ""))
    return f". The checkpoint written before it is kept: `cp {prev} {path}`, then --resume again continues from there"


def saved_config(ckpt, part, cfg, path):
    """The values of config `part` ("train", "recipe", "model", "wrapper") that the checkpoint holds and `cfg`
    has: a field the code no longer has is dropped, a field it gained keeps the value in `cfg`. A checkpoint
    written before the recipe had a config of its own holds the recipe's fields in its train config."""
    config = ckpt["config"]
    if isinstance(config, dict) and part == "recipe" and "recipe" not in config:
        part = "train"
    saved = config.get(part) if isinstance(config, dict) else config
    if not isinstance(saved, (dict, type(None))):
        fail(f"checkpoint {path} holds a {part} config that train.py does not write ({type(saved).__name__}): the "
             "file was edited, or written by another program")
    return {k: v for k, v in (saved or {}).items() if hasattr(cfg, k)}


def start_processes():
    """Distributed only when launched by torchrun: each process reads its share of every batch (data.Loader).
    -> (ddp, rank, world, log): only rank 0 prints."""
    ddp = "RANK" in os.environ
    if ddp:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    return ddp, rank, world, print if rank == 0 else (lambda *a, **k: None)


class Run:
    """One training run: its configs, data, model, optimizers and counters, and the steps of the loop.
    A model's own training terms come through its hooks (see the module docstring): `progress`,
    `train_subset`, `regularizer` and `arch_optimizer` / `arch_step`."""

    def __init__(self, argv, model_name, wrapper_name, model_mod, wrapper_mod, explicit):
        self.ddp, self.rank, self.world, self.log = start_processes()
        self.cfgs, self.ckpt, self.ckpt_path = resolve_configs(model_name, wrapper_name, model_mod, wrapper_mod,
                                                               explicit, self.log)
        self.cfg, cfg, self.recipe = self.cfgs["train"], self.cfgs["train"], self.cfgs["recipe"]
        self.argv, self.model_name, self.wrapper_name, self.explicit = argv, model_name, wrapper_name, explicit
        self.name = model_name + (f"-{wrapper_name}" if wrapper_name else "")
        self.out = Path(cfg.out or f"runs/{self.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if self.out.exists() and not self.out.is_dir():
            fail(f"--out {self.out} is a file, not a directory: choose another --out")
        if not cfg.resume and not cfg.eval_only:
            self.refuse_other_run()
        if cfg.resume and not cfg.eval_only and self.ckpt["wrapper_name"] != wrapper_name:
            fail(f"{self.ckpt_path} is a run of {model_name} with wrapper {self.ckpt['wrapper_name']}, not "
                 f"{wrapper_name}: resume it with the same model and wrapper")
        if self.recipe.batch_size % self.world:
            fail(f"--batch-size {self.recipe.batch_size} must be a multiple of the {self.world} processes")
        self.open_data()
        self.start_device()
        self.build(model_mod, wrapper_mod)
        self.epoch, self.it, self.pos, self.best, self.rng = 0, 0, 0, -1.0, None
        self.val_acc, self.epoch_tally = None, Tally()  # the latest val accuracy; the current epoch's sums
        self.saved_iter = None  # the iteration of the last checkpoint written (or resumed from)
        self.resuming = cfg.resume and not cfg.eval_only
        if not cfg.eval_only:
            self.check_batches()
        self.restore()

    def epoch_rows(self, epoch):
        """The training rows of `epoch` (None: all): with --kind-repeats, repeated in its first --repeat-epochs."""
        repeat = self.rows_repeated is not None and (epoch < self.recipe.repeat_epochs or not self.recipe.repeat_epochs)
        return self.rows_repeated if repeat else self.rows_once

    def check_batches(self):
        """Training needs training batches, answered val questions (for best.pt), and, resumed inside an epoch,
        the batch size that epoch began with (the batches are cut from its order by that size)."""
        self.train_loader.rows = self.epoch_rows(self.ckpt["epoch"] if self.resuming else 0)
        n, split, val = len(self.train_loader), self.train_loader.split, self.val_loader.split
        if n == 0:
            rows = self.train_loader.rows
            kept = "" if rows is None else f", of which the model trains on {len(rows)}"
            fail(f"nothing to train on: the train split of {self.data_dir} has {len(split)} questions{kept}. "
                 "Prepare data with training questions (or check the flags that choose them, e.g. --held-out)")
        if not (val.answers != -100).any():
            fail(f"the val split of {self.data_dir} has no questions with answers ({len(val)} questions): training "
                 "evaluates on it after every epoch and keeps best.pt by its accuracy. Prepare data with val answers")
        ckpt, bs = self.ckpt, self.recipe.batch_size
        old = saved_config(ckpt, "recipe", self.recipe, self.ckpt_path).get("batch_size", bs) if self.resuming else bs
        if self.resuming and ckpt["pos"] and old != bs:
            self.train_loader.batch_size = old
            end = ckpt["iter"] + len(self.train_loader) - ckpt["pos"]  # the iteration that ends the epoch
            fail(f"{self.ckpt_path} stopped inside epoch {ckpt['epoch'] + 1}, after {ckpt['pos']} batches of "
                 f"{old}; with --batch-size {bs} the rest of that epoch would be other batches, some questions "
                 f"seen twice and others never. Finish the epoch at its batch size: --resume --iters {end}; then "
                 f"--resume --batch-size {bs}")

    def open_data(self):
        cfg, ckpt, bs = self.cfg, self.ckpt, self.recipe.batch_size
        if cfg.data and "data" not in self.explicit["train"] and not Path(cfg.data).exists():  # from the checkpoint
            where = "" if Path(cfg.data).is_absolute() else " (a path relative to the folder the run started in)"
            fail(f"{self.ckpt_path} was trained on the data in {cfg.data}{where}, which is not there: pass --data "
                 "with the folder that holds that data now")
        self.data_dir = Path(os.path.abspath(cfg.data or data.ensure_builtin(log=self.log)))
        self.info = data.load_info(self.data_dir)
        if ckpt and ckpt["vocab_hash"] != self.info["vocab_hash"]:
            fail(f"checkpoint {self.ckpt_path} was trained on data with vocabulary {ckpt['vocab_hash']} "
                 f"({ckpt.get('data_dir', '?')}), but {self.data_dir} has vocabulary {self.info['vocab_hash']}: "
                 "word and answer indices would not match. Pass the --data it was trained on, or train from scratch")
        self.train_loader = data.make_loader(self.data_dir, "train", bs, shuffle=True, seed=cfg.seed,
                                             drop_last=self.ddp, rank=self.rank, world=self.world)
        self.val_loader = data.make_loader(self.data_dir, "val", bs, shuffle=False, rank=self.rank,
                                           world=self.world)

    def start_device(self):
        cfg = self.cfg
        self.device = device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.amp == "fp16" and device.type != "cuda":
            fail(f"--amp fp16 needs CUDA (its gradient scaler); on {device.type} use --amp bf16 or --amp off")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # fp16 only: scales the loss

    def build(self, model_mod, wrapper_mod):
        """The model (a wrapper holds the inner model under `prefix`), its optimizers and scheduler."""
        cfg, cfgs, recipe = self.cfg, self.cfgs, self.recipe
        seed_all(cfg.seed)
        try:  # settings that each pass the RULES but do not fit together (e.g. DACT's N over MAC's steps)
            self.inner = inner = model_mod.Model(cfgs["model"], self.info)
            self.raw = raw = wrapper_mod.Model(inner, cfgs["wrapper"]) if wrapper_mod else inner
        except ValueError as e:
            fail(str(e))
        self.prefix = next(n + "." for n, m in raw.named_modules() if m is inner) if raw is not inner else ""
        raw.to(self.device)
        self.arch_opt = inner.arch_optimizer() if hasattr(inner, "arch_optimizer") else None
        arch_ids = {id(p) for g in self.arch_opt.param_groups for p in g["params"]} if self.arch_opt else set()
        self.optimizer = torch.optim.Adam([p for p in raw.parameters() if p.requires_grad and id(p) not in arch_ids],
                                          lr=recipe.lr)
        split = self.train_loader.split
        if (rows := getattr(inner, "train_subset", lambda n: None)(len(split))) is not None:
            self.train_loader.rows = rows  # the model learns from these training questions only
            self.log(f"training on {len(rows)} of the {len(split)} training questions")
        self.rows_once, self.rows_repeated = self.train_loader.rows, None
        if recipe.kind_repeats:
            self.rows_repeated = repeat_kinds(split, self.rows_once, recipe.kind_repeats, self.log)
            if recipe.repeat_epochs:
                self.log(f"  in the first {recipe.repeat_epochs} epochs; the later ones show each question once")
        self.held_out = np.setdiff1d(np.arange(len(split)), self.rows_once if rows is not None else [])
        self.with_progress = [m for m in raw.modules() if hasattr(m, "progress")]
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=recipe.lr_factor,
                                                                    patience=recipe.lr_patience,
                                                                    threshold=recipe.lr_threshold)

    def restore(self):
        """--resume: every state from last.pt; --init: the checkpoint's EMA weights. Then the EMA copy."""
        ckpt, path, log = self.ckpt, self.ckpt_path, self.log
        if self.resuming:
            self.resume_from(ckpt)
        elif ckpt:
            log(f"EMA weights from {path} ({' + '.join(filter(None, (ckpt['model_name'], ckpt['wrapper_name'])))}):")
            unfit = load_weights(self.raw, ckpt["ema"], ckpt["prefix"], self.prefix, log,
                                 ckpt["wrapper_name"] == self.wrapper_name)
            if unfit and not self.cfg.init_partial:
                self.refuse_partial(unfit)
        self.ema = copy.deepcopy(self.raw).requires_grad_(False)
        if self.resuming:
            self.ema.load_state_dict(ckpt["ema"])
        log(f"{self.name}: {sum(p.numel() for p in self.raw.parameters()):,} parameters on {self.device}")
        log(f"trainer: {self.cfg}\nrecipe: {self.recipe}\nmodel: {self.cfgs['model']}" +
            (f"\nwrapper: {self.cfgs['wrapper']}" if self.cfgs["wrapper"] else ""))

    def resume_from(self, ckpt):
        path = self.ckpt_path
        try:
            self.raw.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.arch_opt:
                self.arch_opt.load_state_dict(ckpt["arch_optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"{path} does not fit the {self.name} model built from its own config ({data.first_line(e)}); it was "
                 f"written by another version of the code. Start a new run with --init {path} --init-partial, "
                 "which loads the weights that fit and lists the rest")
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if "lr" in self.explicit["recipe"]:  # the optimizer's state holds the checkpoint's (maybe decayed) rate
            self.log(f"--lr {self.recipe.lr:g} replaces the checkpoint's {self.optimizer.param_groups[0]['lr']:g}")
            for g in self.optimizer.param_groups:
                g["lr"] = self.recipe.lr
        self.epoch, self.it, self.pos, self.best = ckpt["epoch"], ckpt["iter"], ckpt["pos"], ckpt["best_acc"]
        self.val_acc, self.saved_iter = ckpt.get("val_acc"), ckpt["iter"]
        if self.pos and ckpt.get("epoch_tally") and self.rank == 0:  # the epoch's sums so far, over all processes
            self.epoch_tally = Tally.from_state(ckpt["epoch_tally"])
        self.rng, ranks = ckpt["rng"], ckpt.get("rng_ranks") or []
        if self.world > 1 and len(ranks) == self.world:
            self.rng = ranks[self.rank]  # each process continues its own dropout stream
        elif self.world != len(ranks or [0]) and self.pos:
            self.log(f"note: {path} was written by a run with another number of processes; the same batches "
                     "follow, but dropout draws differ from an uninterrupted run until the epoch ends")
        self.log(f"resuming {path}: epoch {self.epoch + 1}, batch {self.pos}, iteration {self.it}, "
                 f"best val acc {self.best:.4f}")

    def refuse_partial(self, unfit):
        """--init of a checkpoint that does not fit the model: name the flags that make the difference."""
        saved = self.ckpt["config"]
        parts = ("model", "wrapper") if self.ckpt["wrapper_name"] == self.wrapper_name else ("model",)
        changed = [f"--{k.replace('_', '-')} {fmt(v)}" for part in parts for k, v in self.explicit[part].items()
                   if fmt((saved.get(part) or {}).get(k, "")) != fmt(v)]
        cause = (f"the flags {' '.join(changed)} change the model it holds: drop them to load it whole" if changed else
                 "its config builds another model here (written by another version of the code?)")
        fail(f"{self.ckpt_path} does not fit this {self.name} model: {len(unfit)} tensors would keep a fresh init "
             f"({', '.join(unfit[:4])}{', ...' if len(unfit) > 4 else ''}); {cause}. Or pass --init-partial to "
             "start them from a fresh init")

    def start_dir(self):
        """The run directory: the command line, full config, versions and git commit; then the model to run
        (compiled, in DDP)."""
        out = self.out
        if self.rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                fail(f"cannot make the run directory {out} ({data.first_line(e)}): choose another --out")
            self.lock_dir()
            record = run_info(self.argv, self.cfgs, self.model_name, self.wrapper_name, self.data_dir, self.info)
            if self.resuming:  # run.json keeps the first invocation; each later one is a line of resumes.jsonl
                self.check_first_record()
                self.trim_metrics()
                append_line(out / "resumes.jsonl", record, "free disk space, then --resume again")
            else:
                try:
                    write_atomic(out / "run.json", lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
                except OSError as e:
                    fail(f"could not write {out / 'run.json'} ({data.first_line(e)}): free disk space (or choose another "
                         "--out), then run the same command again")
            self.log(f"run directory {out}")
        self.model = torch.compile(self.raw) if self.cfg.compile and can_compile(self.device, self.log) else self.raw
        if self.ddp:  # find_unused_parameters: PG+EE, DACT and others leave some parameters out of some batches
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, [self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True)

    def lock_dir(self):
        """Hold an exclusive lock on RUN/.lock for the run's life (the system drops it when the process ends), so
        that a second train.py on the same --out is refused instead of writing the same files."""
        self.lock = open(self.out / ".lock", "a") if fcntl else None
        try:
            if self.lock:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fail(f"{self.out} is in use by another train.py process (it holds {self.out / '.lock'}): wait for that "
                 "run to end, or choose another --out")
        if not self.resuming:
            self.refuse_other_run()  # (a run that began there since __init__ looked)

    def unlock(self):
        if getattr(self, "lock", None):
            self.lock.close()  # (closing the file releases the lock)
            self.lock = None

    def refuse_other_run(self):
        """A new run never overwrites or appends to another run's files."""
        if held := [f for f in RUN_FILES if (self.out / f).exists()]:
            fail(f"{self.out} already holds a run ({', '.join(held)}): add --resume to continue it, or choose "
                 "another --out")

    def check_first_record(self):
        """--resume: say so if run.json, the first invocation's record, is missing or damaged (the run goes on)."""
        path = self.out / "run.json"
        try:
            json.loads(path.read_text())
        except FileNotFoundError:
            self.log(f"note: {self.out} has no run.json (the first invocation's command line and config); this "
                     "invocation is recorded in resumes.jsonl, the configs are in the checkpoints")
        except (OSError, ValueError) as e:
            self.log(f"note: {path} is damaged ({data.first_line(e)}): the first invocation's record is lost; this "
                     "invocation is recorded in resumes.jsonl, the configs are in the checkpoints")

    def trim_metrics(self):
        """--resume: drop the records of metrics.jsonl after the checkpoint's iteration, which the resumed run
        writes again (a kill between an epoch's records and its checkpoint, or a checkpoint put back with `cp
        prev.pt last.pt`), and a line cut by a kill; atomically."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        text = path.read_bytes().decode("utf-8", "replace")
        keep = []
        for line in text.splitlines():
            try:
                if json.loads(line)["iter"] <= self.it:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
        if "".join(keep) != text:
            try:
                write_atomic(path, lambda f: f.write("".join(keep).encode()))
            except OSError as e:
                fail(f"could not rewrite {path} ({data.first_line(e)}): free disk space, then --resume again")
            self.log(f"{path}: dropped {len(text.splitlines()) - len(keep)} lines, records after iteration "
                     f"{self.it} (the checkpoint's) or cut short; the resumed run writes its records again")

    def write(self, rec):
        if self.rank == 0:
            append_line(self.out / "metrics.jsonl", rec, "free disk space, then continue with --resume")

    def checkpoint(self, rng, is_best=False, tally=None):
        """best.pt if is_best, then last.pt (the one before it kept as prev.pt), in this order: killed between
        the two, --resume redoes the epoch's end from the last.pt before and writes the same best.pt again.
        Every rank's RNG state; `tally`: inside an epoch, its running sums over all processes (Tally.state)."""
        rngs, self.saved_iter = [rng] * self.world, self.it
        if self.ddp:
            torch.distributed.all_gather_object(rngs, rng)
        if self.rank == 0:
            state = {"model_name": self.model_name, "wrapper_name": self.wrapper_name, "prefix": self.prefix,
                     "config": {part: c and dataclasses.asdict(c) for part, c in self.cfgs.items()},
                     "model": self.raw.state_dict(), "ema": self.ema.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                     "arch_optimizer": self.arch_opt.state_dict() if self.arch_opt else None,
                     "iter": self.it, "pos": self.pos, "best_acc": self.best, "val_acc": self.val_acc, "rng": rng,
                     "rng_ranks": rngs if self.world > 1 else None, "vocab_hash": self.info["vocab_hash"],
                     "data_dir": str(self.data_dir), "epoch_tally": tally}
            if is_best:
                save_checkpoint(self.out / "best.pt", state)
            save_checkpoint(self.out / "last.pt", state, keep="prev.pt")

    def loss(self, out, batch):
        """The answer NLL (or the model's own "loss"), its "aux_loss", and its regularizer (training only)."""
        loss = out["loss"] if "loss" in out else F.nll_loss(out["log_probs"].float(), batch["answer"],
                                                            ignore_index=-100)
        loss = loss + out.get("aux_loss", 0.0)
        if hasattr(self.raw, "regularizer"):  # e.g. Stack-NMN's weight decay, a term of its training loss
            loss = loss + self.raw.regularizer()
        return loss

    def step(self, batch, total_iters):
        """One weight update (and the model's architecture step, if it has one) -> (out, loss, grad norm)."""
        recipe, optimizer = self.recipe, self.optimizer
        for m in self.with_progress:
            m.progress = self.it / total_iters
        with self.autocast:
            out = self.model(batch)
            loss = self.loss(out, batch)
        loss_value = loss.item()
        checked = all_ranks_mean(loss) if self.ddp else loss_value  # NaN on any process stops all of them
        if not math.isfinite(checked):  # before the update: the weights and last.pt stay good
            fail(f"the loss is {checked} at epoch {self.epoch + 1}, iteration {self.it + 1}; stopped before the "
                 "update. " + (f"The last good checkpoint is {self.out / 'last.pt'} (iteration {self.saved_iter}): "
                               "--resume with a lower --lr" if self.saved_iter is not None else
                               "No checkpoint was written yet (the first comes at the end of epoch 1, or after "
                               f"--ckpt-every iterations): start again, in another --out (or after deleting "
                               f"{self.out}), with a lower --lr or another --seed"))
        if recipe.schedule == "cosine":  # a function of the iteration alone, so --resume needs no state
            for g in optimizer.param_groups:
                g["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * min(self.it / total_iters, 1.0)))
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP averages the gradients over the processes here
        self.scaler.unscale_(optimizer)  # (the scaler is a no-op unless --amp fp16)
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               recipe.clip if recipe.clip > 0 else math.inf)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.arch_step()
        with torch.no_grad():  # EMA, with TF's num_updates warm-up so that short runs average trained weights
            decay = min(recipe.ema, (1 + self.it) / (10 + self.it))
            for e, p in zip(self.ema.parameters(), self.raw.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.raw.buffers()):
                e.copy_(b)
        return out, loss_value, gnorm

    def arch_step(self):
        """The model's architecture step (LNMN: Algorithm 2's alpha update) on a batch of the held-out training
        rows, drawn by (seed, iteration) so that --resume draws the same; skipped while no parameter of
        arch_optimizer requires a gradient (LNMN's --arch-warmup)."""
        if not (self.arch_opt and len(self.held_out)):
            return
        if not any(p.requires_grad for g in self.arch_opt.param_groups for p in g["params"]):
            return
        rng = np.random.default_rng([self.cfg.seed, self.it])
        idx = rng.choice(self.held_out, min(self.recipe.batch_size, len(self.held_out)), False)
        batch = self.train_loader.split.batch(np.sort(idx)[self.rank::self.world])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.inner.arch_step(self.model, batch, self.arch_opt, self.autocast)

    def train_epoch(self):
        """The rest of the current epoch (all of it, unless resumed mid-epoch); False when --iters stops the run."""
        cfg, log, loader = self.cfg, self.log, self.train_loader
        loader.rows = self.epoch_rows(self.epoch)
        sizes = [len(loader.split) if r is None else len(r) for r in map(self.epoch_rows, range(self.recipe.epochs))]
        n_batches, total_iters = len(loader), max(sum(map(loader.batches, sizes)), 1)  # cosine: over --epochs
        loader.set_epoch(self.epoch, start=self.pos)
        batches = iter(loader)  # (making it may draw from the global RNG, so seed after it)
        if self.rng is not None and self.pos > 0:
            set_rng_state(self.rng)  # resumed mid-epoch: continue the RNG streams exactly where they were
        else:
            seed_all(cfg.seed, self.epoch, self.rank)  # epoch e's dropout is a function of (seed, e), like its order
        self.rng = None
        self.model.train()
        tally, t0 = Tally(), time.perf_counter()
        for batch in batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out, loss_value, gnorm = self.step(batch, total_iters)
            self.it, self.pos = self.it + 1, self.pos + 1
            self.train_questions += len(batch["answer"]) * self.world  # the global batch
            tally.add(out, batch, loss_value)
            self.epoch_tally.add(out, batch, loss_value)
            if self.it % cfg.log_every == 0:
                dt, s = time.perf_counter() - t0, tally.reduce(self.device).summary()
                self.train_time, t0 = self.train_time + dt, time.perf_counter()
                log(f"epoch {self.epoch + 1} iter {self.it} | loss {s['loss']:.4f} | acc {100 * (s['acc'] or 0):.1f}% | "
                    f"{tally.rows / dt:.0f} q/s | lr {self.optimizer.param_groups[0]['lr']:.2e} | "
                    f"grad norm {gnorm:.2f}" + "".join(f" | {k} {100 * v:.1f}%" for k, v in s.get("metrics", {}).items()))
                tally = Tally()
            if cfg.iters and self.it >= cfg.iters:
                self.train_time += time.perf_counter() - t0
                return False
            if cfg.ckpt_every and self.it % cfg.ckpt_every == 0 and self.pos < n_batches:  # the epoch's end writes its own
                self.checkpoint(rng_state(), tally=copy.deepcopy(self.epoch_tally).reduce(self.device).state())
        self.train_time += time.perf_counter() - t0
        return True

    def end_epoch(self):
        """Evaluate the EMA weights, step the scheduler (on whole epochs only), log, checkpoint."""
        n_batches = len(self.train_loader)
        rng = rng_state()  # taken before evaluation: a resumed run continues from here
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at (its last iteration's)
        val = evaluate(self.ema, self.val_loader, self.device, self.autocast)
        if self.pos >= n_batches:
            if self.recipe.schedule == "plateau":  # on the model's own val metric where it names one (val_metric)
                metric = getattr(self.inner, "val_metric", None)
                self.scheduler.step(val["metrics"][metric] if metric else val["acc"])
            self.epoch, self.pos = self.epoch + 1, 0
        epoch_f = round(self.epoch + self.pos / n_batches, 4) if self.pos else self.epoch  # fractional after --iters
        self.write({"split": "train", "epoch": epoch_f, "iter": self.it,
                    **self.epoch_tally.reduce(self.device).summary(),
                    "lr": lr, "questions_per_s": self.train_questions / max(self.train_time, 1e-9)})
        self.write({"split": "val", "epoch": epoch_f, "iter": self.it, **val})
        self.log(f"val after epoch {epoch_f} (iter {self.it}): {show(val)}")
        self.last_val, is_best, self.best = val["acc"], val["acc"] > self.best, max(self.best, val["acc"])
        self.val_acc = val["acc"]
        self.checkpoint(rng, is_best, self.epoch_tally.state() if self.pos else None)  # (summed by reduce above)
        if not self.pos:
            self.epoch_tally = Tally()

    def train(self):
        """Epochs until --epochs (or --iters); -> the run's summary."""
        cfg, epochs = self.cfg, self.recipe.epochs
        self.train_time, self.train_questions, self.last_val = 0.0, 0, None
        stop = bool(cfg.iters and self.it >= cfg.iters)
        while self.epoch < epochs and not stop:
            stop = not self.train_epoch()
            self.end_epoch()
        speed = self.train_questions / max(self.train_time, 1e-9)
        if self.last_val is None:
            self.log(f"nothing to train: {self.out} is at epoch {self.epoch} of {epochs}, iteration {self.it}")
        else:
            self.log(f"done: final val acc {100 * self.last_val:.2f}%, best {100 * self.best:.2f}%; average "
                     f"training throughput {speed:.0f} questions/s ({self.train_questions} questions)")
        return {"final_acc": self.last_val, "best_acc": self.best, "questions_per_s": speed, "out": str(self.out)}


def run(argv, model_name, wrapper_name, model_mod, wrapper_mod, explicit):
    r = Run(argv, model_name, wrapper_name, model_mod, wrapper_mod, explicit)
    if r.cfg.eval_only:
        rec = evaluate(r.raw, r.val_loader, r.device, r.autocast)
        r.log(f"val {show(rec)} ({rec['n']} questions)")
        return rec
    try:
        r.start_dir()
        result = r.train()
    finally:
        r.unlock()
    if r.ddp:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
