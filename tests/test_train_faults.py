"""train.py at scale and under faults: torchrun (2 gloo CPU processes), --amp, --ckpt-every, a run killed
with SIGKILL and resumed, damaged checkpoints, failed writes, and checkpoints that do not fit (CPU, seconds).

Same tiny MAC on the tiny built-in mini-CLEVR as tests/test_train.py: the trainer is under test, not the model.
"""
import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train

pytestmark = pytest.mark.robustness  # faults, kills and torchrun: `pytest -m "not robustness"` skips them

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--embed-dim", "8", "--max-steps", "2", "--pixel-channels", "8", "8",
        "--batch-size", "16", "--log-every", "5", "--threads", "1"]
NO_DROPOUT = ["--stem-dropout", "0", "--question-dropout", "0", "--memory-dropout", "0", "--output-dropout", "0",
              "--read-dropout", "0"]


def train_mac(tiny_data, out, *flags):
    return train.main(["mac", "--data", str(tiny_data), "--out", str(out), *TINY, *flags])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def records(out, split):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def error_of(argv):
    """The message of the SystemExit that train.main(argv) must raise."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


def assert_same_state(a, b, parts=("model", "ema")):
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][i][k]) for k in state)


# ----------------------------------------------------------------------------------------------------
# Distributed data parallel: torchrun with 2 CPU processes (gloo)

# Run by torchrun in each process: train.main, then this process's final weights to rank{RANK}.pt
# (only rank 0 writes checkpoints, so the test records the module that DDP wraps).
DDP_CHILD = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import train
wrapped = []
class Recording(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        wrapped.append(module)
        initial.append({k: v.clone() for k, v in module.state_dict().items()})
torch.nn.parallel.DistributedDataParallel = Recording
initial = []
train.main(sys.argv[3:])
torch.save(wrapped[0].state_dict(), os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
torch.save(initial[0], os.path.join(sys.argv[2], "rank%s_init.pt" % os.environ["RANK"]))
"""


def test_torchrun_two_processes_match_one_process_on_the_same_global_batch(tiny_data, tmp_path):
    flags = ["--iters", "4", "--ckpt-every", "2", *NO_DROPOUT]  # stops inside epoch 1, then evaluates
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ROOT), str(tmp_path), "mac", "--data", str(tiny_data), "--out", str(tmp_path / "ddp"), *TINY, *flags]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run directory") == 1  # logs from rank 0 only
    train_mac(tiny_data, tmp_path / "single", *flags)

    rank0, rank1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    single, ddp = load(tmp_path / "single" / "last.pt"), load(tmp_path / "ddp" / "last.pt")
    assert ddp["iter"] == single["iter"] == 4 and len(ddp["rng_ranks"]) == 2
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # gradients synchronised: the ranks never drift
        assert torch.equal(rank0[key], ddp["model"][key]), key  # rank 0's checkpoint holds them
        # A bias in front of a softmax (the attention logits) has gradient 0 up to float noise, and Adam
        # turns noise into steps of up to lr: those two match only to lr * iterations.
        atol = 4 * 1e-4 if key in ("control.attn.bias", "read.attn.bias") else 1e-6
        assert torch.allclose(rank0[key], single["model"][key], rtol=0, atol=atol), \
            (key, (rank0[key] - single["model"][key]).abs().max())

    # validation gathered over the ranks: every val question counted once, the same accuracy
    n_val = len(data.Split(tiny_data, "val"))
    (v_ddp,), (v_single,) = records(tmp_path / "ddp", "val"), records(tmp_path / "single", "val")
    assert v_ddp["n"] == v_single["n"] == n_val
    assert v_ddp["acc"] == pytest.approx(v_single["acc"], abs=1.5 / n_val)
    assert v_ddp["loss"] == pytest.approx(v_single["loss"], rel=1e-4)
    (t_ddp,), (t_single,) = records(tmp_path / "ddp", "train"), records(tmp_path / "single", "train")
    assert t_ddp["n"] == t_single["n"] == 4 * 16  # training tallies summed over the ranks too


# LNMN steps a second optimizer (the alphas, on held-out rows) and PG+EE's joint stage samples programs
# and keeps a moving-average baseline: under DDP the processes must still hold the same weights.
OTHER_MODELS = {
    "lnmn": ["--map-dim", "8", "--dim", "16", "--embed-dim", "8", "--kb-dim", "8", "--pe-dim", "4", "--mem-dim", "8",
             "--out-dim", "16", "--held-out", "0.25", "--output-dropout", "0"],
    "pg_ee": ["--stage", "joint", "--embed-dim", "8", "--hidden-dim", "16", "--module-dim", "4",
              "--classifier-proj-dim", "8", "--classifier-fc-dim", "16", "--lr", "1e-2"],  # rewards within 4 steps
}


@pytest.mark.parametrize("model", sorted(OTHER_MODELS))
def test_torchrun_keeps_the_ranks_identical_for_lnmn_and_pg_ee_joint(model, tiny_data, tmp_path):
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ROOT), str(tmp_path), model, "--data", str(tiny_data), "--out", str(tmp_path / "ddp"), "--iters", "4",
           "--batch-size", "16", "--threads", "1", "--log-every", "2", *OTHER_MODELS[model]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1, init = (load(tmp_path / f) for f in ("rank0.pt", "rank1.pt", "rank0_init.pt"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # weights, alphas and the baseline alike
    moved = [k for k in rank0 if k.endswith("alpha") or k.startswith("pg.")]  # the alpha steps, REINFORCE
    assert moved and any(not torch.equal(rank0[k], init[k]) for k in moved)


def test_distributed_loader_splits_every_batch_and_covers_val_once(tiny_data):
    split = data.Split(tiny_data, "val")
    whole = [b["image_index"].tolist() for b in data.Loader(split, 10, shuffle=True, seed=3)]
    parts = [[b["image_index"].tolist() for b in data.Loader(split, 10, shuffle=True, seed=3, rank=r, world=3)]
             for r in range(3)]
    for b, batch in enumerate(whole):  # rank r holds rows r, r + 3, ... of each single-process batch
        assert sorted(sum((p[b] for p in parts if b < len(p)), [])) == sorted(batch)
    seen = [q for p in parts for batch in p for q in batch]
    assert sorted(seen) == sorted(q for batch in whole for q in batch) and len(seen) == len(split)


# ----------------------------------------------------------------------------------------------------
# Mixed precision

def test_amp_bf16_runs_on_cpu_and_fp16_needs_cuda(tiny_data, tmp_path):
    rec = train_mac(tiny_data, tmp_path / "bf16", "--iters", "2", "--amp", "bf16", "--device", "cpu")
    assert rec["final_acc"] is not None and load(tmp_path / "bf16" / "last.pt")["iter"] == 2
    msg = error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "fp16"), *TINY, "--amp", "fp16",
                    "--device", "cpu"])
    assert "--amp fp16 needs CUDA" in msg and "--amp bf16" in msg


# ----------------------------------------------------------------------------------------------------
# Checkpoints under faults: SIGKILL mid-epoch, damaged files, failed writes, NaN

# Run as `python -c KILL_CHILD ROOT WHEN N train-args...`: train.main, killed by SIGKILL either when the
# Nth training step starts ("step") or halfway through writing the checkpoint of iteration N ("write").
KILL_CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import mac, torch, train
when, n, steps = sys.argv[2], int(sys.argv[3]), [0]
forward, save = mac.Model.forward, torch.save
def counting_forward(self, batch):
    steps[0] += self.training
    if when == "step" and steps[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, batch)
def dying_save(obj, f, *args, **kwargs):
    if when == "write" and isinstance(obj, dict) and obj.get("iter") == n:
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)
mac.Model.forward, torch.save = counting_forward, dying_save
train.main(sys.argv[4:])
"""


@pytest.mark.parametrize("when", ["step", "write"])
def test_sigkill_mid_epoch_then_resume_ends_as_an_uninterrupted_run(tiny_data, tmp_path, when):
    n = len(data.make_loader(tiny_data, "train", 16, shuffle=True))  # batches per epoch
    flags = ["--epochs", "2", "--ckpt-every", "4"]  # dropout stays on: the RNG streams must resume exactly
    first = 4 * (n // 4 + 1)  # the first mid-epoch checkpoint of epoch 2
    kill = first + 3 if when == "step" else first + 4  # 2 steps after it, or while writing the next one
    cmd = [sys.executable, "-c", KILL_CHILD, str(ROOT), when, str(kill), "mac", "--data", str(tiny_data),
           "--out", str(tmp_path / "killed"), *TINY, *flags]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    stopped = load(tmp_path / "killed" / "last.pt")
    assert (stopped["epoch"], stopped["pos"], stopped["iter"]) == (1, first - n, first)  # a mid-epoch checkpoint
    if when == "write":  # the half-written file was never renamed over last.pt
        assert (tmp_path / "killed" / "last.pt.tmp").read_bytes().startswith(b"PK\x03\x04 half")
    # (after "step", the 2 iterations after the checkpoint were lost: the resumed run redoes them)

    train.main(["mac", "--out", str(tmp_path / "killed"), "--resume"])
    train_mac(tiny_data, tmp_path / "whole", *flags)
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "killed" / "last.pt")
    assert (a["epoch"], a["pos"], a["iter"]) == (b["epoch"], b["pos"], b["iter"]) == (2, 0, 2 * n)
    assert_same_state(a, b)
    assert a["scheduler"] == b["scheduler"] and a["best_acc"] == b["best_acc"]


@pytest.fixture(scope="module")
def ckpt_run(tiny_data, tmp_path_factory):
    """A one-epoch run with mid-epoch checkpoints: last.pt (end of epoch 1), prev.pt (the last one before)."""
    out = tmp_path_factory.mktemp("runs") / "ckpt"
    train_mac(tiny_data, out, "--epochs", "1", "--ckpt-every", "4")
    return out


# Run as `python -c EPOCH_END_KILL ROOT WHERE train-args...`: train.main, killed by SIGKILL at one write
# boundary of the first epoch's end: after its train record, halfway through its val record, after the val
# record, or right after best.pt, prev.pt or last.pt is renamed into place.
EPOCH_END_KILL = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import train
where, written, append, replace = sys.argv[2], [], train.append_line, os.replace
def appending(path, rec, advice):
    if where == "half a val record" and rec["split"] == "val":
        line = (json.dumps(rec) + "\\n").encode()
        with open(path, "ab") as f:
            f.write(line[:len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    append(path, rec, advice)
    written.append(rec["split"] + " record")
    if where == written[-1]:
        os.kill(os.getpid(), signal.SIGKILL)
def replacing(src, dst):
    replace(src, dst)
    if "val record" in written and os.path.basename(dst) == where:
        os.kill(os.getpid(), signal.SIGKILL)
train.append_line, os.replace = appending, replacing
train.main(sys.argv[3:])
"""


def same(a, b, where=""):
    """Checkpoints (or any nesting of dicts, lists and tensors) equal, value for value."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("where", ["train record", "half a val record", "val record", "best.pt", "prev.pt", "last.pt"])
def test_sigkill_at_each_write_of_an_epochs_end_then_resume_ends_as_an_uninterrupted_run(ckpt_run, tiny_data,
                                                                                         tmp_path, where):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", EPOCH_END_KILL, str(ROOT), where, "mac", "--data", str(tiny_data), "--out", str(run),
           *TINY, "--epochs", "1", "--ckpt-every", "4"]  # as ckpt_run, the uninterrupted run
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (load(run / "last.pt")["pos"] == 0) == (where == "last.pt")  # killed before last.pt: a mid-epoch one
    train.main(["mac", "--out", str(run), "--resume"])

    for name in ("last.pt", "best.pt"):
        a, b = load(ckpt_run / name), load(run / name)
        for ckpt in (a, b):  # this invocation's settings (--resume) aside
            ckpt["config"]["train"] = {k: v for k, v in ckpt["config"]["train"].items() if k not in train.RUN_FIELDS}
        same(a, b, name)
    timeless = lambda out: [{k: v for k, v in r.items() if k != "questions_per_s"}
                            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert timeless(run) == timeless(ckpt_run)  # no record twice, none cut; the train record counts the whole epoch


def copy_run(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a checkpoint"])
def test_a_damaged_last_checkpoint_names_the_file_and_the_previous_good_one(ckpt_run, tmp_path, damage):
    run = copy_run(ckpt_run, tmp_path / "run")
    good = (run / "last.pt").read_bytes()
    bad = {"truncated": good[:len(good) // 2], "flipped byte": good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 255])
           + good[len(good) // 2 + 1:], "not a checkpoint": b"hello"}[damage]
    (run / "last.pt").write_bytes(bad)
    prev = (run / "prev.pt").read_bytes()
    msg = error_of(["mac", "--out", str(run), "--resume"])
    assert str(run / "last.pt") in msg and ("damaged" in msg or "cannot read" in msg)
    assert f"cp {run / 'prev.pt'} {run / 'last.pt'}" in msg  # the fix, with the previous good checkpoint
    before = load(run / "prev.pt")  # kept, and good: the mid-epoch checkpoint before the epoch's end
    assert (run / "prev.pt").read_bytes() == prev and before["pos"] > 0 and before["iter"] % 4 == 0
    if damage == "flipped byte":  # following the message's advice continues the run
        (run / "last.pt").write_bytes(prev)
        train.main(["mac", "--out", str(run), "--resume", "--iters", str(before["iter"] + 2)])
        assert load(run / "last.pt")["iter"] == before["iter"] + 2


def test_when_prev_is_damaged_too_the_message_does_not_advise_copying_it(ckpt_run, tmp_path):
    run = copy_run(ckpt_run, tmp_path / "run")
    (run / "prev.pt").write_bytes((run / "prev.pt").read_bytes()[:1000])
    (run / "last.pt").write_bytes((run / "prev.pt").read_bytes())  # as after `cp prev.pt last.pt`
    msg = error_of(["mac", "--out", str(run), "--resume"])
    assert f"{run / 'prev.pt'}, the checkpoint before it, is damaged too" in msg and "cp " not in msg
    assert f"--init {run / 'best.pt'}" in msg  # the best weights, for a new run


def test_a_second_train_py_on_the_same_out_is_refused_while_the_first_runs(ckpt_run, tiny_data, tmp_path):
    import fcntl
    run = copy_run(ckpt_run, tmp_path / "run")
    (tmp_path / "new").mkdir()
    for out in (run, tmp_path / "new"):
        with open(out / ".lock", "a") as held:  # what a running train.py holds for its run's life
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            argv = (["--out", str(out), "--resume", "--epochs", "2"] if out == run else
                    ["--data", str(tiny_data), "--out", str(out), *TINY, "--iters", "1"])
            msg = error_of(["mac", *argv])
            assert f"{out} is in use by another train.py process" in msg and "choose another --out" in msg
        assert not (out / "resumes.jsonl").exists() and (out / "run.json").exists() == (out == run)  # nothing written
    train.main(["mac", "--out", str(run), "--resume", "--epochs", "2"])  # the lock goes with its holder
    assert load(run / "last.pt")["epoch"] == 2


def test_a_failed_write_keeps_the_previous_checkpoint(ckpt_run, tmp_path, monkeypatch):
    run = copy_run(ckpt_run, tmp_path / "run")
    before = (run / "last.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # what torch.save does when the disk fills up mid-file
        f.write(b"PK\x03\x04 some bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                           "file data/3: file write failed")
    monkeypatch.setattr(torch, "save", disk_full)
    msg = error_of(["mac", "--out", str(run), "--resume", "--epochs", "2"])
    assert f"could not write checkpoint {run / 'last.pt'}" in msg and "file write failed" in msg
    assert "still holds the previous checkpoint" in msg and "--resume" in msg
    assert (run / "last.pt").read_bytes() == before and not list(run.glob("*.tmp"))
    monkeypatch.undo()
    train.main(["mac", "--out", str(run), "--resume", "--iters", str(load(run / "last.pt")["iter"] + 1)])


class FullDisk:
    """A file whose writes stop halfway with ENOSPC, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(b[:len(b) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_for(monkeypatch, name):
    """Every file opened for writing whose name starts with `name` meets a full disk."""
    real_open = io.open

    def opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        named = isinstance(file, (str, os.PathLike)) and Path(file).name.startswith(name)
        return FullDisk(f) if named and set(mode) & set("wa") else f
    monkeypatch.setattr(io, "open", opening)  # (pathlib writes through io.open)
    monkeypatch.setattr(builtins, "open", opening)


@pytest.mark.parametrize("name", ["run.json", "resumes.jsonl", "metrics.jsonl"])
def test_a_full_disk_on_a_record_is_an_error_that_leaves_the_file_as_it_was(ckpt_run, tiny_data, tmp_path,
                                                                              monkeypatch, name):
    run = tmp_path / "run"
    argv = ["mac", "--data", str(tiny_data), "--out", str(run), *TINY, "--iters", "2"]
    if name != "run.json":  # a run to resume, one epoch on
        run = copy_run(ckpt_run, run)
        argv = ["mac", "--out", str(run), "--resume", "--epochs", "2"]
    before = (run / name).read_bytes() if (run / name).exists() else None
    fill_disk_for(monkeypatch, name)
    msg = error_of(argv)
    assert f"could not write {run / name}" in msg and "No space left on device" in msg
    assert ("run the same command again" if name == "run.json" else "--resume") in msg
    after = (run / name).read_bytes() if (run / name).exists() else None
    assert after == before and not list(run.glob("*.tmp"))  # run.json: none at all, not 0 bytes or half
    monkeypatch.undo()
    train.main(argv)  # and the advice works: the same command, once there is space
    assert json.loads((run / "run.json").read_text())["argv"][1:4] == ["mac", "--data", str(tiny_data)]
    assert load(run / "last.pt")["epoch"] == (0 if name == "run.json" else 2)


def test_a_damaged_run_json_is_reported_and_the_resume_goes_on(ckpt_run, tmp_path, capsys):
    run = copy_run(ckpt_run, tmp_path / "run")
    (run / "run.json").write_text('{"argv": ["train.py", "mac", "--da')  # cut by a full disk
    train.main(["mac", "--out", str(run), "--resume", "--epochs", "2"])
    assert f"note: {run / 'run.json'} is damaged (JSONDecodeError" in capsys.readouterr().out
    assert len((run / "resumes.jsonl").read_text().splitlines()) == 1 and load(run / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_loss_stops_with_a_usable_last_checkpoint(tiny_data, tmp_path, monkeypatch, bad):
    import mac
    forward, steps = mac.Model.forward, [0]

    def poisoned(self, batch):
        out = forward(self, batch)
        steps[0] += self.training
        return {**out, "log_probs": out["log_probs"] * bad} if steps[0] == 6 else out
    monkeypatch.setattr(mac.Model, "forward", poisoned)
    msg = error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TINY, "--ckpt-every", "4"])
    assert f"the loss is {bad}" in msg  # nll of log_probs * inf is +inf
    assert "iteration 6" in msg and f"{tmp_path / 'run' / 'last.pt'} (iteration 4)" in msg
    ckpt = load(tmp_path / "run" / "last.pt")
    assert ckpt["iter"] == 4 and all(v.isfinite().all() for v in ckpt["model"].values())
    monkeypatch.undo()
    train.main(["mac", "--out", str(tmp_path / "run"), "--resume", "--iters", "7"])  # and it resumes
    assert load(tmp_path / "run" / "last.pt")["iter"] == 7


def test_a_run_whose_data_is_gone_says_to_pass_data(tiny_data, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(tiny_data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train_mac("data", tmp_path / "run", "--iters", "2")  # --data as typed: relative
    shutil.rmtree(tmp_path / "data")
    msg = error_of(["mac", "--out", str(tmp_path / "run"), "--resume"])
    assert f"{tmp_path / 'run' / 'last.pt'} was trained on the data in {tmp_path / 'data'}, which is not there" in msg
    assert "pass --data" in msg and "omit --data" not in msg  # (--data was never passed to --resume)


def test_resuming_a_checkpoint_that_does_not_fit_its_model_says_so(ckpt_run, tiny_data, tmp_path):
    run = copy_run(ckpt_run, tmp_path / "run")
    ckpt = load(run / "last.pt")
    for part in ("model", "ema"):  # as from another version of mac.py
        ckpt[part]["renamed.weight"] = ckpt[part].pop("read.attn.weight")
    train.save_checkpoint(run / "last.pt", {k: v for k, v in ckpt.items() if k != "digest"})  # a valid digest
    msg = error_of(["mac", "--out", str(run), "--resume"])
    assert "does not fit the mac model" in msg and str(run / "last.pt") in msg
    assert f"--init {run / 'last.pt'} --init-partial" in msg  # (a plain --init would refuse it too)
    new = ["mac", "--init", str(run / "last.pt"), "--data", str(tiny_data), "--out", str(tmp_path / "new"), *TINY,
           "--iters", "1"]
    assert "read.attn.weight" in error_of(new)
    train.main([*new, "--init-partial"])
    assert load(tmp_path / "new" / "last.pt")["iter"] == 1  # the advice works


class Payload:
    """Unpickling this would create a file: a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_is_never_executed(ckpt_run, tmp_path):
    ckpt = load(ckpt_run / "last.pt")
    ckpt["config"] = Payload(tmp_path / "pwned")
    torch.save(ckpt, tmp_path / "evil.pt")
    msg = error_of(["mac", "--init", str(tmp_path / "evil.pt"), "--eval-only"])
    assert f"cannot read checkpoint {tmp_path / 'evil.pt'}" in msg  # weights_only=True refuses the callable
    assert not (tmp_path / "pwned").exists()
