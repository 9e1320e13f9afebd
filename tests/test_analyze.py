"""Tests for analyze.py on tiny runs made here: `eval` (steps histogram, per kind and family; DACT's
--halt), `dact-plot`, `stack-figure`, `lnmn`, and `load_run` (a run directory is its best.pt; modules come
from train.py's registries only; a wrong or missing checkpoint gives an error that says so)."""
import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analyze
import train

ROOT = Path(__file__).resolve().parents[1]
MAC = ["--dim", "16", "--embed-dim", "8", "--max-steps", "3", "--pixel-channels", "8", "8",
       "--batch-size", "16", "--log-every", "5"]
STACK = ["--dim", "16", "--embed-dim", "8", "--kb-dim", "8", "--pe-dim", "4", "--mem-dim", "8", "--out-dim", "16",
         "--batch-size", "16", "--threads", "1", "--log-every", "1"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Tiny runs of MAC, DACT fine-tuned from it (as the paper), Stack-NMN with the expert layout, and LNMN."""
    root = tmp_path_factory.mktemp("runs")
    data = ["--data", str(tiny_data)]
    train.main(["mac", *data, "--out", str(root / "mac"), "--iters", "3", *MAC])
    train.main(["mac", "dact", *data, "--out", str(root / "dact"), "--iters", "2",
                "--init", str(root / "mac" / "best.pt"), *MAC])
    train.main(["stack_nmn", "--layout", "gt", *data, "--out", str(root / "gt"), "--iters", "2", *STACK])
    train.main(["lnmn", *data, "--out", str(root / "lnmn"), "--iters", "3", "--held-out", "0.25", "--map-dim", "8",
                *STACK])
    return root


def test_eval_reports_steps(runs, tiny_data, tmp_path, capsys):
    rec = analyze.main(["eval", str(runs / "dact" / "best.pt"), "--data", str(tiny_data),
                        "--json", str(tmp_path / "eval.json"), "--batch-size", "32"])
    assert sum(rec["steps_hist"]) == rec["n"] and len(rec["steps_hist"]) == 3
    assert rec["avg_steps"] == pytest.approx(sum(n * c for n, c in enumerate(rec["steps_hist"], 1)) / rec["n"])
    assert set(rec["steps_by_kind"]) == set(rec["acc_by_kind"]) and rec["steps_by_family"]
    fam = rec["acc_by_family"]  # the families' accuracies, weighted by their questions, are the accuracy
    assert sum(rec["n_by_family"].values()) == rec["n"]
    assert sum(fam[f] * n for f, n in rec["n_by_family"].items()) == pytest.approx(rec["acc"] * rec["n"])
    assert json.loads((tmp_path / "eval.json").read_text())["acc"] == rec["acc"]
    assert "steps histogram" in capsys.readouterr().out
    mask = analyze.main(["eval", str(runs / "dact" / "best.pt"), "--data", str(tiny_data), "--halt", "mask"])
    assert mask["acc"] == rec["acc"] and mask["steps_hist"] == rec["steps_hist"]


def test_eval_of_a_fixed_step_run_and_a_run_directory(runs, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("MINI_CLEVR_CACHE", str(tiny_data.parents[1]))  # tiny_data is the built-in data there
    rec = analyze.main(["eval", str(runs / "mac")])           # a run directory: its best.pt, its own data
    assert rec["steps_hist"] == [0, 0, rec["n"]] and rec["avg_steps"] == 3
    assert rec["steps_by_family"] and all(s == 3 for s in rec["steps_by_family"].values())
    out = capsys.readouterr().out
    assert "count_relate" in out                               # the built-in data's family names
    with pytest.raises(SystemExit, match="--halt is for DACT runs"):
        analyze.main(["eval", str(runs / "mac"), "--halt", "mask"])


def test_load_run_reads_best_and_unwraps(runs):
    model, ckpt, _, info = analyze.load_run(runs / "dact")
    best = torch.load(runs / "dact" / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == best["iter"] and type(model).__name__ == "DACT" and not model.training
    inner, _, _, _ = analyze.load_run(runs / "dact", inner=True)
    assert type(inner).__name__ == "MAC" and info["answers"]
    for k, v in inner.state_dict().items():                    # the same weights as inside the DACT
        assert torch.equal(v, model.inner.state_dict()[k]), k


def test_a_checkpoint_never_chooses_what_is_imported(runs, tmp_path):
    ckpt = torch.load(runs / "mac" / "best.pt", map_location="cpu", weights_only=True)
    for change, message in ((dict(model_name="os"), "model 'os', which train.py does not know"),
                            (dict(wrapper_name="subprocess"), "wrapper 'subprocess', which train.py does not know")):
        ckpt.pop("digest", None)
        torch.save({**ckpt, **change}, tmp_path / "odd.pt")
        with pytest.raises(SystemExit, match=message):
            analyze.load_run(tmp_path / "odd.pt")


def test_dact_plot_without_matplotlib_says_so(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        analyze.main(["dact-plot", str(runs / "dact")])
    summary = analyze.run_summary(runs / "dact")
    assert summary["wrapper"] == "dact" and 1 <= summary["avg_steps"] <= 3
    assert analyze.run_summary(runs / "mac")["avg_steps"] == 3          # a MAC: its fixed step count


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional")
def test_dact_plot_draws_figs_3_4_6(runs, tmp_path):
    analyze.main(["dact-plot", str(runs / "mac"), str(runs / "dact"), "--out", str(tmp_path)])
    for name in ("fig3_steps_per_family.png", "fig4_acc_vs_steps.png", "fig6_question0.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((runs / "dact" / "eval.json").read_text())["steps_by_family"]


def test_stack_figure(runs, tiny_data, tmp_path, monkeypatch, capsys):
    argv = ["stack-figure", str(runs / "gt" / "last.pt"), "--data", str(tiny_data), "--index", "1",
            "--out", str(tmp_path / "fig.png")]
    if HAS_MATPLOTLIB:                                         # matplotlib is optional
        analyze.main(argv)
        assert (tmp_path / "fig.png").stat().st_size > 0
    else:
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            analyze.main(argv)
    assert "step 9:" in capsys.readouterr().out                # the numbers are printed either way
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # no matplotlib: a clear message
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        analyze.main(argv)
    with pytest.raises(SystemExit, match="holds a 'mac' model, not 'stack_nmn' or 'lnmn'"):
        analyze.main(["stack-figure", str(runs / "mac")])


def test_lnmn_analysis(runs, tiny_data, tmp_path, capsys):
    argv = ["lnmn", str(runs / "lnmn" / "last.pt"), "--data", str(tiny_data), "--max-batches", "1",
            "--out", str(tmp_path / "an")]
    analyze.main(argv)
    text = capsys.readouterr().out
    for word in ("Table 6", "without max", "hard-max", "conv2("):
        assert word in text
    res = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert len(res["accuracy"]) == 8 and len(res["expressions"]) == 8
    analyze.main(argv[:-2])                                    # no --out: next to the checkpoint, in its run
    assert json.loads((runs / "lnmn" / "analysis.json").read_text())["expressions"] == res["expressions"]
    if HAS_MATPLOTLIB:                                         # the heat map needs matplotlib, which is optional
        assert (tmp_path / "an" / "alphas.png").exists()
    else:
        assert "pip install matplotlib" in text and not (tmp_path / "an" / "alphas.png").exists()
    # a checkpoint of another model or vocabulary, or none: an error that says so, not a traceback
    ckpt = torch.load(runs / "lnmn" / "last.pt", map_location="cpu", weights_only=True)
    ckpt.pop("digest", None)
    for change, message in ((dict(model_name="stack_nmn"), "holds a 'stack_nmn' model, not 'lnmn'"),
                            (dict(vocab_hash="0"), "vocabulary 0 .* Pass the --data it was trained on")):
        torch.save({**ckpt, **change}, tmp_path / "bad.pt")
        with pytest.raises(SystemExit, match=message):
            analyze.main([argv[0], str(tmp_path / "bad.pt"), *argv[2:]])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        analyze.main([argv[0], str(tmp_path / "absent.pt"), *argv[2:]])


def test_cli_runs_as_a_script(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "eval", str(runs / "dact"), "--json",
                           str(tmp_path / "e.json")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "per family (by average steps)" in proc.stdout and (tmp_path / "e.json").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "analyze.py")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "eval" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Bad arguments: one "error: " line that says what is wrong and what to do, never a traceback
# ------------------------------------------------------------------------------------------------

BAD_ARGS = [  # (argv: {runs} the tiny runs, {tmp} a folder with empty/, a file and cut/; the message)
    (["eval", "{runs}/mac", "--device", "cuda"], r"--device cuda, but torch.cuda.is_available\(\) is False"),
    (["eval", "{runs}/mac", "--device", "mps"], r"--device mps, but torch.backends.mps.is_available\(\) is False"),
    (["eval", "{tmp}/absent"], "no checkpoint at .*absent: pass a run directory"),
    (["eval", "{tmp}/empty"], "empty is a directory without a best.pt"),
    (["eval", "{runs}/mac", "--halt", "mask"], "--halt is for DACT runs; .* is a 'mac' run without a wrapper: drop"),
    (["eval", "{runs}/gt", "--halt", "compact"], "is a 'stack_nmn' run without a wrapper: drop --halt"),
    (["eval", "{runs}/mac", "--batch-size", "0"], "--batch-size 0 is out of range: pass a number of at least 1"),
    (["eval", "{runs}/mac", "--batch-size", "-3"], "--batch-size -3 is out of range"),
    (["eval", "{runs}/mac", "--json", "{tmp}"], "--json .* is a folder: pass a file name"),
    (["stack-figure", "{runs}/gt", "--index", "100000"], r"--index 100000 is out of range: .* has \d+ questions; "
                                                         r"pass 0 to \d+"),
    (["stack-figure", "{runs}/gt", "--index", "-1"], "--index -1 is out of range: pass a number of at least 0"),
    (["stack-figure", "{runs}/mac"], "holds a 'mac' model, not 'stack_nmn' or 'lnmn'"),
    (["stack-figure", "{tmp}/empty"], "empty is a directory without a best.pt"),
    (["lnmn", "{runs}/gt"], "holds a 'stack_nmn' model, not 'lnmn'"),
    (["lnmn", "{runs}/lnmn", "--max-batches", "-1"], "--max-batches -1 is out of range"),
    (["lnmn", "{runs}/lnmn", "--threads", "-1"], "--threads -1 is out of range"),
    (["lnmn", "{runs}/lnmn", "--out", "{tmp}/file"], "--out .*file is a file: pass a folder name"),
    (["dact-plot", "{runs}/dact", "--question", "100000"], "--question 100000 is out of range: .* pass 0 to"),
    (["dact-plot", "{runs}/dact", "--question", "-1"], "--question -1 is out of range"),
    (["dact-plot", "{tmp}/empty"], "empty is not a run directory of train.py \\(no run.json\\)"),
    (["dact-plot", "{runs}/dact/best.pt"], "best.pt is not a run directory of train.py"),
    (["dact-plot", "{tmp}/cut"], "cut: run.json or metrics.jsonl is not what train.py writes .*delete a last line"),
    (["dact-plot", "{runs}/dact", "--out", "{tmp}/file"], "--out .*file is a file: pass a folder name"),
]


@pytest.mark.robustness
@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_give_an_error(argv, message, runs, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(analyze, "pyplot", lambda: object())  # dact-plot checks everything before it draws
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "run.json").write_text((runs / "dact" / "run.json").read_text())
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"split": "val", "acc": 0.5}\n{"split": "va')  # a crash
    argv = [a.format(runs=runs, tmp=tmp_path) for a in argv] + ["--data", str(tiny_data)]
    with pytest.raises(SystemExit, match=message) as err:
        analyze.main(argv)
    assert str(err.value).startswith("error: ")


def altered(ckpt):
    """Checkpoint changes that no longer fit the model their config builds, or are not train.py's."""
    config = json.loads(json.dumps(ckpt["config"]))
    config["model"]["dim"] *= 2
    return [(dict(config=config), "does not fit the mac model built from its own config .*size mismatch"),
            (dict(ema={}), "does not fit the mac model .*Missing key"),
            (dict(config=None), "does not fit the mac model"),
            (dict(wrapper_name="dact"), "does not fit the mac model .*DACT"),
            (dict(model_name=["mac"]), "model '\\['mac'\\]', which train.py does not know"),
            (dict(data_dir=3), "is not a checkpoint train.py wrote")]


@pytest.mark.robustness
def test_an_altered_checkpoint_gives_an_error(runs, tmp_path):
    ckpt = torch.load(runs / "mac" / "best.pt", map_location="cpu", weights_only=True)
    ckpt.pop("digest")
    for change, message in altered(ckpt):
        torch.save({**ckpt, **change}, tmp_path / "odd.pt")
        with pytest.raises(SystemExit, match=message):
            analyze.main(["eval", str(tmp_path / "odd.pt")])


FORBIDDEN = {"__import__", "importlib.__import__", "exec", "eval", "compile", "torch.load", "pickle.load",
             "pickle.loads", "runpy.run_path", "runpy.run_module"}  # ways to import, run or unpickle what is read


def calls(path):
    """(innermost enclosing function or None, the called expression, the call) for every call in a file."""
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                found.append((inner, ast.unparse(child.func), child))
            visit(child, inner)
    visit(ast.parse(path.read_text()), None)
    return found


@pytest.mark.parametrize("name", ["analyze.py", "bench.py", "dact.py", "act.py"])
def test_modules_are_imported_through_the_registries_only(name):
    """A module is imported by a name only in analyze.registered, and only as train.py's registry[name]
    (a checkpoint's or a flag's name is looked up, never imported); nothing in these files imports, runs or
    unpickles what it reads (checkpoints are read by data.read_checkpoint, with weights_only)."""
    for func, called, node in calls(ROOT / name):
        if "import_module" in called or called.endswith(("spec_from_file_location", "exec_module", "load_module")):
            assert (func, called, ast.unparse(node.args[0])) == ("registered", "importlib.import_module",
                                                                "registry[name]"), (name, func, ast.unparse(node))
        assert called not in FORBIDDEN, (name, func, ast.unparse(node))
