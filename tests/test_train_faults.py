"""train.py at scale and under faults: torchrun (2 gloo CPU processes), --amp, --ckpt-every, a run killed
with SIGKILL and resumed, damaged checkpoints, failed writes, and checkpoints that do not fit (CPU, seconds).

Same tiny MAC on the tiny built-in mini-CLEVR as tests/test_train.py: the trainer is under test, not the model.
"""
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

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--embed-dim", "8", "--max-steps", "2", "--pixel-channels", "8", "8",
        "--batch-size", "16", "--log-every", "5", "--threads", "1"]
NO_DROPOUT = ["--stem-dropout", "0", "--question-dropout", "0", "--memory-dropout", "0", "--output-dropout", "0"]


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
torch.nn.parallel.DistributedDataParallel = Recording
train.main(sys.argv[3:])
torch.save(wrapped[0].state_dict(), os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
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
