"""Tests for bench.py: `python bench.py --quick` end to end (every benchmark, one table, one JSON), the
topological-execution benchmark's rows and ratios, and DACT's benchmark on a trained run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import train

ROOT = Path(__file__).resolve().parents[1]
MAC = ["--dim", "16", "--embed-dim", "8", "--max-steps", "3", "--pixel-channels", "8", "8",
       "--batch-size", "16", "--log-every", "5"]
EXECUTORS = ("naive", "topo", "postorder", "agenda", "level")


def test_quick_runs_every_benchmark(tiny_data, tmp_path):
    """The CI command: tiny sizes, the built-in tiny data, one table naming the device, one JSON."""
    env = {**os.environ, "MINI_CLEVR_CACHE": str(tiny_data.parents[1])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--device", "cpu", "--threads", "1",
                           "--json", str(tmp_path / "bench.json")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["device"].startswith("cpu (") and res["threads"] == 1 and res["torch"] and res["quick"]
    assert f"bench.py on {res['device']}, torch {res['torch']}, 1 CPU threads" in proc.stdout
    assert [(r["batch"], r["executor"]) for r in res["topo"]["rows"]] == [(b, e) for b in (1, 6) for e in EXECUTORS]
    assert [r["name"].split(",")[0] for r in res["dact"]["rows"]] == ["mac", "DACT compact", "DACT mask"]
    assert "untrained" in res["dact"]["note"] and res["dact"]["questions"] == 32
    assert [r["model"] for r in res["train"]["rows"]] == list(bench.TrainBenchConfig().models)
    for r in res["train"]["rows"]:
        assert r["ms_per_step"] > 0 and r["batch"] == 16 and r["params"] > 0
    table = proc.stdout[proc.stdout.rindex("benchmark case"):]  # the summary: every benchmark's figures
    for line in ("topo      batch 6, naive/topo", "dact      DACT compact / base", "train     pg_ee"):
        assert line in table, table


def test_topo_rows_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    # in-process, so --no-steady-allocator: leave pytest's malloc alone
    bench.main(["topo", "--channels", "4", "--size", "6", "--batch-sizes", "1", "6", "--repeats", "1",
                "--num-images", "2", "--no-steady-allocator", "--device", "cpu", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu") and set(res) >= {"topo", "torch", "threads"} and "dact" not in res
    info = res["topo"]
    assert [(r["batch"], r["executor"]) for r in info["rows"]] == [(b, e) for b in (1, 6) for e in EXECUTORS]
    for row in info["rows"]:
        assert row["calls"] > 0 and row["fwd_ms"] > 0 and row["step_ms"] > 0 and row["held_mb"] > 0
        assert row["max_abs_diff"] < 1e-4
    assert {r["executor"] for r in info["ratios"]} == {"topo", "postorder", "agenda", "level"}
    assert info["config"]["channels"] == 4 and info["config"]["batch_sizes"] == [1, 6]


def test_flags_fail_loudly():
    with pytest.raises(SystemExit):
        bench.main(["topo", "--executors", "fast"])
    with pytest.raises(SystemExit, match="unknown 'mac\\+ponder'"):
        bench.main(["train", "--models", "mac+ponder", "--json", os.devnull])


@pytest.fixture(scope="module")
def dact_run(tiny_data, tmp_path_factory):
    """A MAC run, then DACT fine-tuned from it with --init (as the paper)."""
    root = tmp_path_factory.mktemp("dact-runs")
    train.main(["mac", "--data", str(tiny_data), "--out", str(root / "mac"), "--iters", "3", *MAC])
    train.main(["mac", "dact", "--data", str(tiny_data), "--out", str(root / "dact"), "--iters", "2",
                "--init", str(root / "mac" / "best.pt"), *MAC])
    return root


def test_dact_compares_mac_compact_and_mask(dact_run, tiny_data, tmp_path):
    res = bench.main(["dact", "--init", str(dact_run / "dact" / "best.pt"), "--data", str(tiny_data),
                      "--mac", str(dact_run / "mac" / "best.pt"), "--batch-size", "16", "--limit", "32",
                      "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    rows = json.loads((tmp_path / "bench.json").read_text())["dact"]["rows"]
    assert [r["name"].split(",")[0] for r in rows] == ["mac", "DACT compact", "DACT mask"]
    assert rows[0]["avg_steps"] == 3                                     # the inner MAC runs all its steps
    for r in rows[1:]:                                                   # each DACT row against the MAC row
        assert r["speedup_vs_mac"] == pytest.approx(r["questions_per_s"] / rows[0]["questions_per_s"])
    for r in rows:                                                       # right answers out of 32 questions
        assert r["acc"] * 32 == pytest.approx(round(r["acc"] * 32))
    assert rows[1]["acc"] == rows[2]["acc"] and rows[1]["avg_steps"] == rows[2]["avg_steps"]
    assert res["dact"]["questions"] == 32
    with pytest.raises(SystemExit, match="is not a DACT run"):
        bench.main(["dact", "--init", str(dact_run / "mac"), "--json", os.devnull])


# ------------------------------------------------------------------------------------------------
# Bad arguments: one "error: " line that says what is wrong and what to do, never a traceback
# ------------------------------------------------------------------------------------------------

BAD_ARGS = [  # (argv: {runs} the MAC and DACT runs, {tmp} a folder holding empty/; the message)
    (["topo", "--device", "cuda"], r"--device cuda, but torch.cuda.is_available\(\) is False \(use --device cpu\)"),
    (["--device", "mps"], r"--device mps, but torch.backends.mps.is_available\(\) is False"),
    (["topo", "--batch-sizes", "1", "0"], "--batch-sizes 0 is out of range: pass a number of at least 1"),
    (["topo", "--batch-sizes", "-2"], "--batch-sizes -2 is out of range"),
    (["topo", "--repeats", "0"], "--repeats 0 is out of range: pass a number of at least 1"),
    (["topo", "--channels", "0"], "--channels 0 is out of range"),
    (["topo", "--size", "0"], "--size 0 is out of range"),
    (["topo", "--num-images", "0"], "--num-images 0 is out of range"),
    (["topo", "--seed", "-1"], "--seed -1 is out of range: pass a number of at least 0"),
    (["topo", "--threads", "-1"], "--threads -1 is out of range: pass a number of at least 0"),
    (["--quick", "--threads", "-1"], "--threads -1 is out of range"),
    (["dact", "--batch-size", "0"], "--batch-size 0 is out of range: pass a number of at least 1"),
    (["dact", "--repeats", "0"], "--repeats 0 is out of range"),
    (["dact", "--limit", "-1"], "--limit -1 is out of range: pass a number of at least 0"),
    (["train", "--batch-size", "-1"], "--batch-size -1 is out of range: pass a number of at least 0"),
    (["train", "--repeats", "0"], "--repeats 0 is out of range"),
    (["topo", "--json", "{tmp}"], "--json .* is a folder: pass a file name"),
    (["dact", "--init", "{tmp}/absent"], "no checkpoint at .*absent"),
    (["dact", "--init", "{tmp}/empty"], "empty is a directory without a best.pt"),
    (["dact", "--init", "{runs}/mac"], "mac is not a DACT run: it is a 'mac' run without a wrapper; pass a run of"),
    (["dact", "--init", "{runs}/dact", "--mac", "{runs}/dact"], "--mac takes a run of fixed steps; .* is a 'mac' run "
                                                                "in 'dact': pass the run without a wrapper"),
]


@pytest.mark.robustness
@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_give_an_error(argv, message, dact_run, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("MINI_CLEVR_CACHE", str(tiny_data.parents[1]))  # --quick: the tiny data, made already
    (tmp_path / "empty").mkdir()
    argv = [a.format(runs=dact_run, tmp=tmp_path) for a in argv] + ["--quick"]
    with pytest.raises(SystemExit, match=message) as err:
        bench.main(argv + ([] if "--json" in argv else ["--json", os.devnull]))
    assert str(err.value).startswith("error: ")


@pytest.mark.robustness
def test_timed_runs_at_least_once():
    """A budget spent before the first run (--budget-s 0) still times one run, after the warm-up."""
    calls = []
    ms, result = bench.timed(lambda: calls.append(1) or len(calls), torch.device("cpu"), repeats=5, budget_s=0)
    assert len(calls) == 2 and result == 2 and ms >= 0
