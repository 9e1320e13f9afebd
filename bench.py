"""The benchmarks, one entry point: batched vs per-example program execution (topo_exec.py), DACT's
halting against its inner model (dact.py), and one training step of every model (train.py).

    python bench.py                       # all three; one table naming the device; bench.json
    python bench.py --device cuda         # the GPU check (a few minutes)
    python bench.py --quick               # tiny sizes, seconds (tests, CI)
    python bench.py topo [--batch-sizes 1 8 64 ...] [--executors naive topo ...]   # one of them
    python bench.py dact [--init RUN] [--mac RUN] [--limit N]
    python bench.py train [--models mac mac+dact ...] [--data DIR]
    python bench.py topo -h               # a benchmark's flags, with their defaults and --quick values

Common flags: --device auto|cpu|cuda|mps, --quick, --threads N, --json FILE. A time is the best of a few
runs after a warm-up run, device work included; a ratio compares rows measured side by side in one run.

topo: every executor of topo_exec.EXECUTORS on the same batches of programs from the built-in generator,
with an IEP-sized bank (128 x 14 x 14): module calls, plan, forward, forward + backward and cell time
(inside the module calls), the memory a forward pass keeps for backward, (CUDA) a step's peak memory.
dact: questions/s of DACT `--halt compact` and `--halt mask` against its inner model running all steps
(or --mac). Without --init: an untrained MAC (laptop preset) in DACT, halting bias 2 (times only).
train: the trainer's own step (train.Run.step) on one training batch, laptop preset, built-in data.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import io
import json
import math
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

import analyze  # load_run: the one loader of trained runs
import data
import topo_exec
import train
from topo_exec import EXECUTORS, make_bank, make_plan, parse


# ------------------------------------------------------------------------------------------------
# Timing, memory and the machine
# ------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, repeats, budget_s=math.inf, warmup=None):
    """Best wall time of fn in ms (device work included) after one warm-up run (`warmup`, default fn),
    and fn's last result. Runs fn `repeats` times, or fewer (at least once) once the runs have
    taken budget_s."""
    (warmup or fn)()
    times, result = [], None
    while not times or (len(times) < repeats and sum(times) < budget_s):  # at least one run
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), result


class CallClock:
    """Forward hooks on a bank's modules: the number of module calls and the time inside them."""

    def __init__(self, bank, device):
        self.calls, self.seconds, self.device, self.handles = 0, 0.0, device, []
        for module in bank.values():
            self.handles.append(module.register_forward_pre_hook(self.before))
            self.handles.append(module.register_forward_hook(self.after))

    def before(self, module, args):
        sync(self.device)
        self.start = time.perf_counter()

    def after(self, module, args, out):
        sync(self.device)
        self.calls += 1
        self.seconds += time.perf_counter() - self.start

    def remove(self):
        for handle in self.handles:
            handle.remove()


def held_after(fn):
    """MB of the tensors made by fn that are still alive when it returns (its output included): after
    a forward pass, what autograd keeps for backward. Any device; tracked with a dispatch mode."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    made = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    made[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            return out
    with Track():
        out = fn()
    held = sum(n for ref, n in made.values() if not ref.expired())
    del out
    return held / 2 ** 20


def steady_cpu_allocator():
    """glibc hands big freed blocks back to the OS and page-faults them in again on the next
    allocation, at a cost that depends on what ran before (RESULTS.md has a measurement). Fixed
    thresholds make each executor pay for its own work only, as CUDA's caching allocator does. Linux
    with glibc only; else nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap for reuse


def machine(device):
    """The device in words, with the torch version and CPU threads."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"{device.type} ({cpu})"
    return {"device": name, "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------
# topo: batched topological vs per-example execution of program trees (topo_exec.py)
# ------------------------------------------------------------------------------------------------

@dataclass
class TopoConfig:
    batch_sizes: tuple[int, ...] = ()  # default: 1 8 64 256 512 1024 on CUDA, 1 8 64 on CPU (its convs are slow)
    executors: tuple[str, ...] = ("naive", "topo", "postorder", "agenda", "level")  # naive and the schedules at the top
    channels: int = 128  # REFERENCE.md PG+EE: the execution engine's modules are 128 wide
    size: int = 14  # REFERENCE.md: ResNet-101 conv4 features are 14 x 14
    repeats: int = 5  # timed runs per figure (the best is reported), after one warm-up run
    budget_s: float = 20.0  # stop repeating a figure once its runs have taken this long
    num_images: int = 200  # built-in mini-CLEVR images whose questions (10 each) make the program pool
    seed: int = 0
    steady_allocator: bool = True  # on CPU, fix glibc's malloc thresholds (see steady_cpu_allocator)


def measure(name, programs, bank, feats, probe, cfg, device):
    """One executor on one batch: calls, plan / forward / forward+backward / cell times, memory."""
    schedule, run = EXECUTORS[name]
    params = list(bank.parameters()) + [feats]
    row = {"executor": name, "batch": len(programs)}
    plan = None
    if schedule:
        def planned():
            parse.cache_clear()  # the plan's cost includes reading the programs
            return make_plan(programs, bank, schedule, device)
        row["plan_ms"], plan = timed(planned, device, cfg.repeats, cfg.budget_s)
        row["levels"] = plan.depth

    def forward():
        return run(plan, programs, bank, feats)  # (B, C, H, W)

    def step():
        for p in params:
            p.grad = None
        (forward() * probe).sum().backward()
    clock = CallClock(bank, device)
    with torch.no_grad():
        out = forward()
    row["calls"] = clock.calls
    cells = []
    for _ in range(min(cfg.repeats, 3)):
        clock.seconds = 0.0
        forward()
        cells.append(1e3 * clock.seconds)
    row["cell_ms"] = min(cells)  # time inside the module calls alone, best of up to 3 forward passes
    clock.remove()
    row["fwd_ms"] = timed(forward, device, cfg.repeats, cfg.budget_s)[0]
    row["step_ms"] = timed(step, device, cfg.repeats, cfg.budget_s)[0]
    row["held_mb"] = held_after(forward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return row, out


def ratios(B, rows):
    """naive / each other executor at batch B: calls, times (with and without the plan) and memory."""
    base, out = rows["naive"], []
    for name, row in rows.items():
        if name == "naive":
            continue
        ratio = {"batch": B, "executor": name, "calls": base["calls"] / row["calls"],
                 "fwd": base["fwd_ms"] / row["fwd_ms"],
                 "fwd_with_plan": base["fwd_ms"] / (row["fwd_ms"] + row["plan_ms"]),
                 "step": base["step_ms"] / row["step_ms"], "cell": base["cell_ms"] / row["cell_ms"],
                 "memory": row["held_mb"] / base["held_mb"]}
        if "peak_mb" in row:
            ratio["peak_memory"] = row["peak_mb"] / base["peak_mb"]
        out.append(ratio)
    return out


def bench_topo(cfg, device, log=print):
    """Every executor on the same batches of each size -> {"programs", "rows", "ratios", "summary"}."""
    sizes = cfg.batch_sizes or ((1, 8, 64, 256, 512, 1024) if device.type == "cuda" else (1, 8, 64))
    if unknown := [name for name in cfg.executors if name not in EXECUTORS]:
        train.fail(f"unknown executor {unknown[0]!r}; choose from {', '.join(EXECUTORS)}")
    if device.type == "cpu" and cfg.steady_allocator:
        steady_cpu_allocator()
    pool = topo_exec.clevr_programs(cfg.num_images, cfg.seed)
    heights = [parse(tuple(p))[0][2] for p in pool]
    torch.manual_seed(cfg.seed)
    bank = make_bank([t for p in pool for t in p], cfg.channels).to(device)
    info = {"programs": {"pool": len(pool), "mean_length": float(np.mean([len(p) for p in pool])),
                         "mean_height": float(np.mean(heights)), "max_height": max(heights), "modules": len(bank)},
            "rows": [], "ratios": [], "summary": []}
    log(f"programs: {len(pool)} from the built-in generator, mean length {info['programs']['mean_length']:.1f}, "
        f"mean height {info['programs']['mean_height']:.1f} (max {max(heights)}), {len(bank)} modules of "
        f"{cfg.channels} x {cfg.size} x {cfg.size}")
    log(f"{'batch':>5} {'executor':<10} {'calls':>6} {'levels':>6} {'plan ms':>8} {'fwd ms':>9} {'fwd+bwd ms':>10} "
        f"{'cell ms':>9} {'held MB':>8} {'peak MB':>8} {'max|diff|':>9}")
    rng = np.random.default_rng(cfg.seed)
    for B in sizes:
        programs = [pool[i] for i in rng.integers(0, len(pool), B)]
        feats = torch.randn(B, cfg.channels, cfg.size, cfg.size, device=device, requires_grad=True)  # (B, C, H, W)
        probe = torch.randn(B, cfg.channels, cfg.size, cfg.size, device=device)  # d loss / d roots
        rows, reference = {}, None
        for name in cfg.executors:
            row, out = measure(name, programs, bank, feats, probe, cfg, device)
            reference = out if reference is None else reference
            row["max_abs_diff"] = (out - reference).abs().max().item()  # against the first executor
            rows[name] = row
            info["rows"].append(row)
            log(f"{B:>5} {name:<10} {row['calls']:>6} {row.get('levels', ''):>6} "
                f"{row.get('plan_ms', float('nan')):>8.2f} "
                f"{row['fwd_ms']:>9.2f} {row['step_ms']:>10.2f} {row['cell_ms']:>9.2f} {row['held_mb']:>8.1f} "
                f"{row.get('peak_mb', float('nan')):>8.1f} {row['max_abs_diff']:>9.1e}")
        for r in ratios(B, rows) if "naive" in rows else []:
            info["ratios"].append(r)
            text = (f"calls {r['calls']:.1f}x, forward {r['fwd']:.2f}x ({r['fwd_with_plan']:.2f}x with the plan), "
                    f"forward+backward {r['step']:.2f}x, cell {r['cell']:.2f}x; memory held {r['memory']:.2f}"
                    + (f", peak {r['peak_memory']:.2f}" if "peak_memory" in r else ""))
            info["summary"].append((f"batch {B}, naive/{r['executor']}", text))
            log(f"{'':>5} naive/{r['executor']}: {text}")
    return info


# ------------------------------------------------------------------------------------------------
# dact: DACT's halting (compact, mask) against its inner model running every step (dact.py)
# ------------------------------------------------------------------------------------------------

@dataclass
class DactConfig:
    init: str = ""  # a DACT run (directory or checkpoint); none: an untrained MAC in DACT, timings only
    mac: str = ""  # a fixed-step run for the baseline row (default: DACT's inner model, all its steps)
    data: str = ""  # prepared data (default: the run's; without --init the built-in mini-CLEVR)
    batch_size: int = 256
    limit: int = 0  # time only the first LIMIT val questions (0: all)
    repeats: int = 3  # report the fastest of this many passes


def trainer_run(spec, data_dir, device, **flags):
    """train.Run for spec "MODEL" or "MODEL+WRAPPER" with the laptop preset on data_dir: its untrained
    model (seeded), optimizers and loaders, as `python train.py MODEL [WRAPPER] --preset laptop` builds
    them. The CPU threads stay as they are (a preset's --threads is overridden)."""
    argv = [*spec.split("+"), "--data", str(data_dir), "--preset", "laptop", "--device", str(device.type),
            "--threads", str(torch.get_num_threads())]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's lines about presets and parameters
        return train.Run(argv, *train.parse_args(argv))


def dact_models(cfg, device, quick, log):
    """-> (DACT model, baseline model, baseline name, data dir, note)."""
    if cfg.init:
        dact, ckpt, data_dir, _ = analyze.load_run(cfg.init, cfg.data or None)
        if ckpt["wrapper_name"] != "dact":
            train.fail(f"{cfg.init} is not a DACT run: it is {analyze.run_kind(ckpt)}; pass a run of "
                       "`python train.py MODEL dact`, or omit --init to time an untrained one")
        note = f"DACT run {cfg.init}"
        base_name = f"{ckpt['model_name']}, all {dact.inner.max_steps} steps (DACT's inner model)"
    else:
        data_dir = data.resolve(cfg.data) if cfg.data else data.ensure_builtin(tiny=quick, log=log)
        dact = trainer_run("mac+dact", data_dir, device).raw.eval()
        with torch.no_grad():
            dact.halting_unit.bias.fill_(2.0)  # h_n = 1 - sigmoid(W c_n + 2) small: p_n falls fast, rows halt
        note = "no --init: an untrained MAC (laptop preset) in DACT, halting bias 2; times only, accuracy is chance"
        base_name = f"mac, all {dact.inner.max_steps} steps (DACT's inner model)"
    base = dact.inner
    if cfg.mac:
        base, mac_ckpt, _, _ = analyze.load_run(cfg.mac, data_dir)
        if mac_ckpt["wrapper_name"]:
            train.fail(f"--mac takes a run of fixed steps; {cfg.mac} is {analyze.run_kind(mac_ckpt)}: pass the "
                       "run without a wrapper (the MAC that DACT was fine-tuned from)")
        base_name = f"{mac_ckpt['model_name']}, all {base.max_steps} steps ({cfg.mac})"
    return dact, base, base_name, data_dir, note


def bench_dact(cfg, device, quick=False, log=print):
    """Questions per second, accuracy and average steps of the baseline, DACT compact and DACT mask."""
    dact, base, base_name, data_dir, note = dact_models(cfg, device, quick, log)
    batches = list(data.make_loader(data_dir, "val", cfg.batch_size, shuffle=False))
    if cfg.limit:
        batches = batches[:max(1, -(-cfg.limit // cfg.batch_size))]
    on = [{k: v.to(device) for k, v in b.items()} for b in batches]
    n = sum(len(b["answer"]) for b in batches)
    log(f"{note}\ninference on {n} val questions of {data_dir}, batch {cfg.batch_size}, best of {cfg.repeats}")

    @torch.inference_mode()
    def one_pass(model):  # -> (right answers, steps), summed over the questions
        hits, steps = 0, 0.0
        for b in on:
            out = model(b)
            hits += (out["log_probs"].argmax(1) == b["answer"]).sum()
            steps += out["steps"].sum() if "steps" in out else model.max_steps * len(b["answer"])
        return hits, steps
    rows = []
    for name, model, halt in [(base_name, base, None), ("DACT compact", dact, "compact"), ("DACT mask", dact, "mask")]:
        if halt:
            model.cfg = dataclasses.replace(model.cfg, halt=halt)
        model.to(device).eval()
        with torch.inference_mode():
            ms, (hits, steps) = timed(lambda: one_pass(model), device, cfg.repeats, warmup=lambda: model(on[0]))
        rows.append({"name": name, "questions_per_s": 1e3 * n / ms, "acc": float(hits) / n,
                     "avg_steps": float(steps) / n})
    log(f"  {'':55s} {'q/s':>9s} {'x base':>6s} {'acc':>7s} {'steps':>6s}")
    for r in rows:
        r["speedup_vs_mac"] = r["questions_per_s"] / rows[0]["questions_per_s"]
        log(f"  {r['name']:55s} {r['questions_per_s']:9.0f} {r['speedup_vs_mac']:6.2f} "
            f"{100 * r['acc']:6.2f}% {r['avg_steps']:6.2f}")
    summary = [(f"{r['name']} / base", f"{r['speedup_vs_mac']:.2f}x questions/s ({r['questions_per_s']:.0f}), "
                f"{r['avg_steps']:.2f} steps, acc {100 * r['acc']:.2f}%") for r in rows[1:]]
    return {"checkpoint": cfg.init or None, "mac": cfg.mac or None, "note": note, "batch_size": cfg.batch_size,
            "questions": n, "max_steps": dact.max_steps, "rows": rows, "summary": summary}


# ------------------------------------------------------------------------------------------------
# train: one training step of every model, as the trainer takes it (train.py)
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainBenchConfig:
    models: tuple[str, ...] = ("mac", "mac+act", "mac+dact", "stack_nmn", "lnmn", "pg_ee")  # MODEL or MODEL+WRAPPER
    data: str = ""  # prepared data (default: the built-in mini-CLEVR; with --quick its tiny version)
    batch_size: int = 0  # 0: each model's laptop-preset batch size
    repeats: int = 5  # timed steps (the best is reported), after one warm-up step


def bench_train(cfg, device, quick=False, log=print):
    """ms per training step, questions per second, parameters and (CUDA) peak memory, per model."""
    for spec in cfg.models:
        model, _, wrapper = spec.partition("+")
        if model not in train.MODELS or (wrapper and wrapper not in train.WRAPPERS):
            train.fail(f"--models: unknown {spec!r}; models {', '.join(train.MODELS)}, "
                       f"wrappers {', '.join(train.WRAPPERS)} (as MODEL+WRAPPER)")
    data_dir = data.resolve(cfg.data) if cfg.data else data.ensure_builtin(tiny=quick, log=log)
    log(f"one training step (train.Run.step) on a training batch of {data_dir}, laptop preset, best of {cfg.repeats}")
    log(f"  {'model':<12s} {'batch':>5s} {'ms/step':>9s} {'q/s':>8s} {'params':>10s} {'peak MB':>8s}")
    rows, summary = [], []
    for spec in cfg.models:
        run = trainer_run(spec, data_dir, device, **({"batch_size": cfg.batch_size} if cfg.batch_size else {}))
        run.model = run.raw  # no torch.compile, no DDP: the step as a single process takes it
        batch = {k: v.to(device) for k, v in next(iter(run.train_loader)).items()}
        total = max(run.recipe.epochs * len(run.train_loader), 1)
        ms = timed(lambda: run.step(batch, total), device, cfg.repeats)[0]
        B = len(batch["answer"])
        row = {"model": spec, "batch": B, "ms_per_step": ms, "questions_per_s": 1e3 * B / ms,
               "params": sum(p.numel() for p in run.raw.parameters())}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run.step(batch, total)
            row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        rows.append(row)
        log(f"  {spec:<12s} {row['batch']:>5d} {ms:>9.1f} {row['questions_per_s']:>8.0f} {row['params']:>10,d} "
            f"{row.get('peak_mb', float('nan')):>8.1f}")
        summary.append((spec, f"{ms:.1f} ms/step, {row['questions_per_s']:.0f} questions/s (batch {row['batch']})"))
    return {"data": str(data_dir), "rows": rows, "summary": summary}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

LEAST = {  # name -> {flag: least value}; the common flags under "common"
    "common": {"threads": 0},
    "topo": {"batch_sizes": 1, "channels": 1, "size": 1, "repeats": 1, "num_images": 1, "seed": 0},
    "dact": {"batch_size": 1, "limit": 0, "repeats": 1},
    "train": {"batch_size": 0, "repeats": 1},
}
BENCHES = {  # name -> (config, function, what it measures, --quick values)
    "topo": (TopoConfig, bench_topo, "batched topological vs per-example execution of program trees",
             dict(channels=4, size=6, batch_sizes=(1, 6), repeats=1, num_images=2)),
    "dact": (DactConfig, bench_dact, "DACT compact vs mask vs its inner model, questions per second",
             dict(batch_size=16, limit=32, repeats=1)),
    "train": (TrainBenchConfig, bench_train, "one training step of every model (laptop preset)",
              dict(batch_size=16, repeats=1)),
}


def parse_args(argv):
    """-> (benchmarks to run, their configs, common settings)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=argparse.SUPPRESS,
                        help="auto: cuda, then mps, then cpu (default: auto)")
    common.add_argument("--quick", action="store_true", default=argparse.SUPPRESS, help="tiny sizes, seconds")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="CPU threads (0: torch's default)")
    common.add_argument("--json", default=argparse.SUPPRESS, help="write every figure here (default: bench.json)")
    p = argparse.ArgumentParser(prog="bench.py", parents=[common], description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", metavar="{" + ",".join(BENCHES) + "}", help="one benchmark (default: all)")
    for name, (cls, _, what, quick) in BENCHES.items():
        s = sub.add_parser(name, parents=[common], help=what, description=what)
        train.add_flags(s.add_argument_group(f"{name} ({cls.__name__})"), cls, name, {"quick": quick},
                        {"executors": list(EXECUTORS)})
    ns = vars(p.parse_args(argv))
    settings = {"device": "auto", "quick": False, "threads": 0, "json": "bench.json"}
    settings.update({k: ns[k] for k in settings if k in ns})
    names = [ns["bench"]] if ns.get("bench") else list(BENCHES)
    analyze.check_least(settings, LEAST["common"])
    cfgs = {}
    for name in names:
        cls, _, _, quick = BENCHES[name]
        cfg = train.with_values(cls(), quick) if settings["quick"] else cls()
        cfgs[name] = train.with_values(cfg, {k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(name + ".")})
        analyze.check_least(dataclasses.asdict(cfgs[name]), LEAST[name])
    analyze.writable(settings["json"], "--json")
    return names, cfgs, settings


def main(argv=None):
    names, cfgs, settings = parse_args(argv)
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = train.pick_device(settings["device"], 0)
    result = {**machine(device), "quick": settings["quick"]}
    header = f"bench.py on {result['device']}, torch {result['torch']}, {result['threads']} CPU threads"
    print(header)
    for name in names:
        _, fn, what, _ = BENCHES[name]
        print(f"\n== {name}: {what}")
        kw = {} if name == "topo" else {"quick": settings["quick"]}
        try:
            result[name] = {"config": dataclasses.asdict(cfgs[name]), **fn(cfgs[name], device, **kw)}
        except data.DataError as err:
            train.fail(str(err))
    print(f"\n{header}\n{'benchmark':<9s} {'case':<48s} figure")
    for name in names:
        for case, text in result[name]["summary"]:
            print(f"{name:<9s} {case[:48]:<48s} {text}")
    with open(settings["json"], "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {settings['json']}")
    return result


if __name__ == "__main__":
    main()
