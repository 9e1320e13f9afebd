"""Tests for train.py: the command line, a smoke run, exact resume, --init, clear errors (CPU, seconds).

Runs go through `train.main(argv)` in the test process (fast); one goes through `python train.py`.
They use MAC on the tiny built-in mini-CLEVR (`tiny_data` in conftest.py) at a size where a step
takes milliseconds: the trainer is what is under test here, not the model.
"""
import argparse
import dataclasses
import importlib
import inspect
import json
import math
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import dact
import data
import mac
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--embed-dim", "8", "--max-steps", "2", "--pixel-channels", "8", "8",
        "--batch-size", "16", "--log-every", "5"]
COMMON = ["--data", "--out", "--epochs", "--iters", "--batch-size", "--lr", "--seed", "--device", "--resume",
          "--init", "--eval-only", "--preset", "--clip", "--ema", "--threads"]


def train_mac(tiny_data, out, *flags):
    return train.main(["mac", "--data", str(tiny_data), "--out", str(out), *TINY, *flags])


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def error_of(argv):
    """The message of the SystemExit that train.main(argv) must raise."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """One finished one-epoch run, whose checkpoints the --init and error tests start from."""
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    train_mac(tiny_data, out, "--epochs", "1")
    return out


# ----------------------------------------------------------------------------------------------------
# Command line

def test_help_lists_models_and_wrappers(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in [*train.MODELS, *train.WRAPPERS])


def test_model_help_lists_common_and_model_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["mac", "-h"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag in COMMON + ["--dim", "--max-steps", "--self-attention", "--no-self-attention"]:
        assert flag in text, flag
    assert f"(default: {mac.Config().dim};" in text or f"(default: {mac.Config().dim})" in text


def test_help_shows_the_recipe_group_with_each_presets_values(capsys):
    with pytest.raises(SystemExit):
        train.main(["mac", "dact", "-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {auto,paper,laptop,gqa}" in text  # paper once
    recipe = text[text.index(" recipe: "):text.index(" mac (mac.Config):")]
    for name in train.RECIPE_FIELDS:
        assert "--" + name.replace("_", "-") in recipe, name
    assert "(paper: 30; laptop: 11; gqa: 5)" in recipe  # DACT's paper epochs over MAC's, then MAC's presets


@pytest.mark.parametrize("argv, message", [
    (["mac", "--bogus"], "unrecognized arguments: --bogus"),
    (["mac", "--ep", "3"], "unrecognized arguments: --ep"),  # no abbreviations
    (["mac", "--dim", "abc"], "invalid int value: 'abc'"),
    (["mac", "--lr", "fast"], "invalid float value: 'fast'"),
    (["mac", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["mac", "--preset", "huge"], "invalid choice: 'huge'"),
    (["nope"], "invalid choice: 'nope'"),
    (["mac", "--dim", "8", "act"], "put the wrapper right after the model"),
    ([], "required: model"),
])
def test_bad_command_lines_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_are_generated_from_the_config_dataclass():
    @dataclasses.dataclass
    class Cfg:
        dim: int = 512  # hidden size
        rate: float = 0.5  # a rate
        gate: bool = False  # an option
        sizes: tuple[int, ...] = (1, 2)  # any number of ints
        pair: tuple = (3, 4)  # a bare tuple: typed by its default
        limit: typing.Optional[int] = None  # optional
        mode: typing.Literal["a", "b"] = "a"  # a choice

    p = argparse.ArgumentParser(allow_abbrev=False)
    train.add_flags(p, Cfg, "model", presets={"laptop": {"dim": 64}})
    assert "hidden size (default: 512; laptop: 64)" in " ".join(p.format_help().split())
    given = vars(p.parse_args(["--dim", "8", "--gate", "--sizes", "5", "6", "7", "--pair", "1", "2",
                               "--limit", "3", "--mode", "b"]))
    assert given == {"model.dim": 8, "model.gate": True, "model.sizes": [5, 6, 7], "model.pair": [1, 2],
                     "model.limit": 3, "model.mode": "b"}  # rate was not given: absent, so presets apply
    assert vars(p.parse_args(["--no-gate"])) == {"model.gate": False}
    cfg = train.with_values(Cfg(), {k.split(".")[1]: v for k, v in given.items()})
    assert cfg.sizes == (5, 6, 7) and cfg.pair == (1, 2)
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


# ----------------------------------------------------------------------------------------------------
# Runs

def test_smoke_run_through_the_command_line(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "mac", "--data", str(tiny_data), "--iters", "5",
           "--out", str(out), *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "preset paper (--data given)" in proc.stdout and "questions/s" in proc.stdout

    run = json.loads((out / "run.json").read_text())
    assert run["argv"][1:4] == ["mac", "--data", str(tiny_data)] and run["model"] == "mac"
    assert run["config"]["model"]["dim"] == 16 and run["config"]["train"]["iters"] == 5
    assert set(run["versions"]) == {"python", "torch", "numpy", "h5py"} and run["git_commit"]
    assert run["data_dir"] == str(tiny_data)

    val = [r for r in records(out) if r["split"] == "val"]
    assert val and val[-1]["iter"] == 5
    for key in ("split", "epoch", "iter", "acc", "acc_by_kind", "loss"):
        assert key in val[-1], key
    assert list(val[-1]["acc_by_kind"]) == list(data.QUESTION_KINDS)
    assert val[-1]["n"] == len(data.Split(tiny_data, "val"))  # every val question, once

    ckpt = load(out / "last.pt")
    assert data.CKPT_KEYS <= set(ckpt) and ckpt["iter"] == 5 and ckpt["model_name"] == "mac"
    assert ckpt["vocab_hash"] == data.load_info(tiny_data)["vocab_hash"]
    assert not list(out.glob("*.tmp"))  # written atomically


def test_resume_continues_exactly(tiny_data, tmp_path):
    n = len(data.make_loader(tiny_data, "train", 16, shuffle=True))
    train_mac(tiny_data, tmp_path / "whole", "--epochs", "2")
    train_mac(tiny_data, tmp_path / "cut", "--epochs", "2", "--iters", str(n + 3))  # stops inside epoch 2
    stopped = load(tmp_path / "cut" / "last.pt")
    assert (stopped["epoch"], stopped["pos"], stopped["iter"]) == (1, 3, n + 3)
    first = (tmp_path / "cut" / "run.json").read_bytes()
    train.main(["mac", "--out", str(tmp_path / "cut"), "--resume"])  # configs come from the checkpoint

    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "cut" / "last.pt")
    assert (b["epoch"], b["pos"], b["iter"]) == (2, 0, 2 * n)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][i][k]) for k in state)
    assert a["scheduler"] == b["scheduler"]
    assert (tmp_path / "cut" / "run.json").read_bytes() == first  # written once, by the first invocation
    (resumed,) = map(json.loads, (tmp_path / "cut" / "resumes.jsonl").read_text().splitlines())
    assert resumed["argv"][1:] == ["mac", "--out", str(tmp_path / "cut"), "--resume"] and resumed["config"]


def test_resume_keeps_the_runs_threads_unless_given(tiny_data, tmp_path):
    # the number of threads changes how CPU sums round: a resume on its default would leave the run's curve
    train_mac(tiny_data, tmp_path, "--epochs", "3", "--iters", "2", "--threads", "1")
    train.main(["mac", "--out", str(tmp_path), "--resume", "--iters", "4"])
    train.main(["mac", "--out", str(tmp_path), "--resume", "--iters", "6", "--threads", "2"])
    resumes = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [r["config"]["train"]["threads"] for r in resumes] == [1, 2]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # as conftest sets it, for the tests after this one


def test_lr_flag_on_resume_reaches_the_optimizer(tiny_data, tmp_path):
    # the optimizer state in last.pt carries its own rate: a --lr given on --resume must replace it
    train_mac(tiny_data, tmp_path, "--epochs", "1", "--lr", "1e-3", "--lr-patience", "9")  # no plateau cut
    train.main(["mac", "--out", str(tmp_path), "--resume", "--epochs", "2", "--lr", "2e-4"])
    assert [r["lr"] for r in records(tmp_path) if r["split"] == "train"] == [1e-3, 2e-4]
    assert all(g["lr"] == 2e-4 for g in load(tmp_path / "last.pt")["optimizer"]["param_groups"])


def test_epoch_record_keeps_the_rate_it_trained_at(tiny_data, tmp_path):
    # at lr 1e-7 val cannot move, so the plateau scheduler cuts after epoch 2; the cut is epoch 3's
    train_mac(tiny_data, tmp_path, "--epochs", "2", "--lr", "1e-7", "--lr-patience", "0")
    assert [r["lr"] for r in records(tmp_path) if r["split"] == "train"] == [1e-7, 1e-7]
    assert load(tmp_path / "last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-8)


def test_cosine_schedule_decays_to_zero_and_resumes_exactly(tiny_data, tmp_path):
    n = len(data.make_loader(tiny_data, "train", 16, shuffle=True))
    flags = ["--epochs", "2", "--schedule", "cosine", "--lr", "1e-3"]
    train_mac(tiny_data, tmp_path / "whole", *flags)
    lrs = [r["lr"] for r in records(tmp_path / "whole") if r["split"] == "train"]
    assert lrs[0] < 1e-3 and lrs[1] < lrs[0] and lrs[1] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * (2 * n - 1) / (2 * n))))
    train_mac(tiny_data, tmp_path / "cut", *flags, "--iters", str(n + 2))
    train.main(["mac", "--out", str(tmp_path / "cut"), "--resume"])
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "cut" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_kind_repeats_show_each_question_of_a_kind_that_many_times_an_epoch(tiny_data, tmp_path):
    split, repeats = data.Split(tiny_data, "train"), (1, 2, 1, 1, 3)
    rows = train.repeat_kinds(split, None, repeats, lambda *a: None)
    assert (split.kinds >= 0).all()  # mini-CLEVR's programs give every question a kind
    assert (np.bincount(rows, minlength=len(split)) == np.array(repeats)[split.kinds]).all()
    train_mac(tiny_data, tmp_path, "--epochs", "1", "--kind-repeats", *map(str, repeats))
    (epoch,) = [r for r in records(tmp_path) if r["split"] == "train"]
    assert epoch["iter"] == -(-len(rows) // 16)  # the epoch's batches cover the repeated rows
    train_mac(tiny_data, tmp_path / "first", "--epochs", "2", "--kind-repeats", *map(str, repeats), "--repeat-epochs", "1")
    ends = [r["iter"] for r in records(tmp_path / "first") if r["split"] == "train"]
    assert ends == [-(-len(rows) // 16), -(-len(rows) // 16) + -(-len(split) // 16)]  # then each question once
    assert "kind_repeats must be a list of ints (none, or 5: one per question kind" in error_of(
        ["mac", "--kind-repeats", "1", "2"])
    only_counts = np.flatnonzero(split.kinds == 0)
    with pytest.raises(SystemExit, match="have no Compare Attribute question"):
        train.repeat_kinds(split, only_counts, (1, 1, 1, 1, 2), lambda *a: None)


def test_a_run_with_repeats_in_its_first_epoch_resumes_exactly(tiny_data, tmp_path):
    flags = ["--epochs", "2", "--kind-repeats", "1", "1", "1", "1", "2", "--repeat-epochs", "1"]
    train_mac(tiny_data, tmp_path / "whole", *flags)
    first = [r["iter"] for r in records(tmp_path / "whole") if r["split"] == "train"][0]
    train_mac(tiny_data, tmp_path / "cut", *flags, "--iters", str(first - 2))  # stops inside the repeated epoch
    train.main(["mac", "--out", str(tmp_path / "cut"), "--resume", "--iters", str(first + 3)])  # inside the next
    train.main(["mac", "--out", str(tmp_path / "cut"), "--resume"])
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "cut" / "last.pt")
    assert a["iter"] == b["iter"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_init_into_another_config_reports_the_keys(run_dir, tiny_data, tmp_path, capsys):
    train_mac(tiny_data, tmp_path / "init", "--init", str(run_dir / "best.pt"), "--iters", "2",
              "--max-steps", "3", "--self-attention", "--init-partial")
    text = capsys.readouterr().out
    missing = next(line for line in text.splitlines() if "missing keys" in line)
    assert "control.q_step.2.weight" in missing or not missing.endswith("none"), missing
    assert "unexpected keys (ignored): none" in text
    assert (tmp_path / "init" / "last.pt").exists()


def test_init_takes_the_model_config_from_the_checkpoint(run_dir, tiny_data, tmp_path, monkeypatch, capsys):
    # run_dir's MAC has TINY's sizes; neither --data's paper sizes nor the laptop preset may replace them
    monkeypatch.setattr(data, "ensure_builtin", lambda tiny=False, log=print: tiny_data)
    for argv in (["--data", str(tiny_data)], ["--preset", "laptop"]):
        out = tmp_path / argv[0][2:]
        train.main(["mac", "dact", *argv, "--out", str(out), "--init", str(run_dir / "best.pt"), "--iters", "1",
                    "--batch-size", "16", "--threads", "1"])
        text = capsys.readouterr().out
        assert f"loaded {len(load(run_dir / 'best.pt')['ema'])} of" in text and "shape mismatches (keep their fresh init): none" in text
        cfg = load(out / "last.pt")["config"]
        assert cfg["model"] == load(run_dir / "best.pt")["config"]["model"]  # defaults < checkpoint's config
        assert cfg["recipe"]["lr"] == (2e-3 if argv[0] == "--preset" else 1e-4)  # the recipe: paper < preset
    train_mac(tiny_data, tmp_path / "flags", "--init", str(run_dir / "best.pt"), "--iters", "1", "--memory-dropout", "0.5")
    assert load(tmp_path / "flags" / "last.pt")["config"]["model"]["memory_dropout"] == 0.5  # < flags
    train_mac(tiny_data, tmp_path / "unwrapped", "--init", str(tmp_path / "data" / "last.pt"), "--iters", "1")
    assert "unexpected keys (ignored): halting_unit.weight, halting_unit.bias" in capsys.readouterr().out  # DACT's own


@pytest.mark.parametrize("flags, named", [
    (["--dim", "32"], "the flags --dim 32 change the model it holds"),  # shape mismatches
    (["--max-steps", "3"], "the flags --max-steps 3 change the model it holds"),  # missing keys
    (["--max-steps", "1"], "the flags --max-steps 1 change the model it holds"),  # keys left out
])
def test_init_refuses_a_checkpoint_that_does_not_fit(run_dir, tiny_data, tmp_path, flags, named):
    msg = error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TINY, *flags,
                    "--init", str(run_dir / "best.pt"), "--iters", "1"])
    assert f"{run_dir / 'best.pt'} does not fit this mac model" in msg and named in msg
    assert "--init-partial" in msg and not (tmp_path / "run").exists()


def test_the_data_path_is_stored_absolute_so_a_run_resumes_from_any_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_data.parent)
    train.main(["mac", "--data", tiny_data.name, "--out", str(tmp_path / "run"), *TINY, "--iters", "2"])
    ckpt = load(tmp_path / "run" / "last.pt")
    assert ckpt["data_dir"] == ckpt["config"]["train"]["data"] == str(tiny_data)  # not "prepared" as typed
    monkeypatch.chdir(tmp_path)  # another folder: the same data, not the built-in one
    train.main(["mac", "--out", str(tmp_path / "run"), "--resume", "--iters", "3"])
    assert load(tmp_path / "run" / "last.pt")["iter"] == 3


def test_eval_only_evaluates_a_checkpoint(run_dir, tiny_data, capsys):
    rec = train.main(["mac", "--init", str(run_dir / "best.pt"), "--eval-only", "--data", str(tiny_data)])
    assert rec["acc"] == pytest.approx(load(run_dir / "best.pt")["val_acc"])
    assert "missing keys (keep their fresh init): none" in capsys.readouterr().out


def test_preset_auto_is_laptop_on_the_built_in_data_and_flags_win(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "ensure_builtin", lambda tiny=False, log=print: tiny_data)
    train.main(["mac", "--out", str(tmp_path / "laptop"), "--iters", "1", *TINY])
    assert "preset laptop (built-in data)" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "laptop" / "run.json").read_text())["config"]
    assert cfg["model"]["dim"] == 16 and cfg["train"]["preset"] == "laptop"  # the flag beats the preset
    for key, value in mac.PRESETS["laptop"].items():
        if "--" + key.replace("_", "-") not in TINY:
            where = "model" if hasattr(mac.Config, key) else "recipe" if key in train.RECIPE_FIELDS else "train"
            assert cfg[where][key] == json.loads(json.dumps(value)), key


def test_a_nan_loss_stops_the_run_with_a_message(tiny_data, tmp_path, monkeypatch):
    forward = mac.Model.forward
    monkeypatch.setattr(mac.Model, "forward", lambda self, b: {"log_probs": forward(self, b)["log_probs"] * torch.nan})
    msg = error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "nan"), *TINY])
    assert "the loss is nan" in msg and "iteration 1;" in msg
    assert "No checkpoint was written yet" in msg and "last.pt" not in msg  # (none exists to name)


# ----------------------------------------------------------------------------------------------------
# Clear errors

def test_error_for_a_missing_data_directory(tmp_path):
    assert str(tmp_path / "nowhere") in error_of(["mac", "--data", str(tmp_path / "nowhere"), "--iters", "1"])


def test_error_for_a_checkpoint_of_another_vocabulary(run_dir, tiny_data, tmp_path):
    ckpt = load(run_dir / "best.pt")
    ckpt["vocab_hash"] = "0123456789ab"
    torch.save(ckpt, tmp_path / "other-vocab.pt")
    msg = error_of(["mac", "--data", str(tiny_data), "--init", str(tmp_path / "other-vocab.pt"), "--eval-only"])
    assert "vocabulary" in msg and "0123456789ab" in msg and data.load_info(tiny_data)["vocab_hash"] in msg


def test_error_for_a_checkpoint_of_another_model(run_dir, tiny_data, tmp_path):
    ckpt = load(run_dir / "best.pt")
    ckpt["model_name"] = "stack_nmn"
    torch.save(ckpt, tmp_path / "other-model.pt")
    msg = error_of(["mac", "--data", str(tiny_data), "--init", str(tmp_path / "other-model.pt")])
    assert "'stack_nmn' model, not 'mac'" in msg


def test_a_run_directory_stands_for_its_best_checkpoint(run_dir, tmp_path):
    run = tmp_path / "run"                                       # best.pt and last.pt told apart by iter
    run.mkdir()
    for name, it in (("best.pt", 111), ("last.pt", 222)):
        torch.save({**data.read_checkpoint(run_dir / name), "iter": it}, run / name)
    assert data.read_checkpoint(run)["iter"] == 111
    (run / "best.pt").unlink()
    with pytest.raises(data.DataError, match="without a best.pt"):
        data.read_checkpoint(run)


def test_error_for_a_damaged_or_missing_checkpoint(run_dir, tiny_data, tmp_path):
    (tmp_path / "cut.pt").write_bytes((run_dir / "last.pt").read_bytes()[:1000])
    assert "cannot read checkpoint" in error_of(["mac", "--init", str(tmp_path / "cut.pt")])
    assert "no checkpoint at" in error_of(["mac", "--init", str(tmp_path / "absent.pt")])
    assert "no checkpoint at" in error_of(["mac", "--resume", "--out", str(tmp_path / "empty")])
    assert "already holds a run" in error_of(["mac", "--data", str(tiny_data), "--out", str(run_dir)])
    for leftover in ("best.pt", "metrics.jsonl"):  # a run folder without last.pt is still another run's
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / leftover).write_bytes(b"kept")
        assert "already holds a run" in error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / leftover)])
        assert (tmp_path / leftover / leftover).read_bytes() == b"kept"


RECIPES = {  # (model, wrapper): what --preset paper must give the trainer (the papers' and official codes')
    ("mac", None): dict(lr=1e-4, batch_size=64, epochs=25, clip=8.0, ema=0.999, schedule="plateau", lr_threshold=1e-3),
    ("mac", "dact"): dict(lr=1e-4, batch_size=64, epochs=30, clip=8.0, ema=0.999, schedule="plateau"),
    ("stack_nmn", None): dict(lr=1e-4, batch_size=64, epochs=18, clip=0.0, ema=0.999, schedule="constant"),
    ("lnmn", None): dict(lr=1e-4, batch_size=64, epochs=30, clip=0.0, ema=0.999, schedule="constant"),
    ("pg_ee", None): dict(lr=5e-4, batch_size=64, epochs=9, clip=0.0, ema=0.0, schedule="constant"),
}


@pytest.mark.parametrize("model,wrapper", RECIPES)
def test_preset_paper_gives_each_models_own_training_recipe(model, wrapper, tiny_data, tmp_path, capsys):
    """What the trainer will use, read from the Run it builds: the optimizer's rate, the batch, clipping,
    the moving average and the schedule, not the preset's dict."""
    argv = [model, *([wrapper] if wrapper else []), "--data", str(tiny_data), "--preset", "paper",
            "--out", str(tmp_path / "run"), "--threads", "1"]
    r = train.Run(argv, *train.parse_args(argv))
    want = RECIPES[model, wrapper]
    assert r.optimizer.param_groups[0]["lr"] == want["lr"]
    assert r.train_loader.batch_size == want["batch_size"] and r.recipe.epochs == want["epochs"]
    assert r.recipe.clip == want["clip"] and r.recipe.schedule == want["schedule"] and r.recipe.ema == want["ema"]
    for key, attr in (("lr_factor", "factor"), ("lr_patience", "patience"), ("lr_threshold", "threshold")):
        if key in want:
            assert getattr(r.scheduler, attr) == want[key], key
    assert "preset paper (--data given)" in capsys.readouterr().out


@pytest.mark.parametrize("name", train.MODELS)
def test_each_models_paper_preset_states_its_whole_recipe_each_with_a_source(name):
    mod = importlib.import_module(train.MODELS[name])
    paper = mod.PRESETS["paper"]
    need = {f.name for f in dataclasses.fields(train.Recipe)
            if f.default is dataclasses.MISSING or (f.name in train.PLATEAU_FIELDS and paper.get("schedule") == "plateau")}
    assert need <= set(paper), f"{name}: {sorted(need - set(paper))}"
    assert all(getattr(train.paper_recipe(mod), k) == paper[k] for k in need)
    lines = inspect.getsource(mod).splitlines()  # the source of each field: a comment on its line
    i, depth = next(i for i, line in enumerate(lines) if '"paper": dict(' in line), 0
    while True:
        code, _, comment = lines[i].partition("#")
        depth += code.count("(") - code.count(")")
        named = set(re.findall(r"(\w+)=", code)) & set(train.RECIPE_FIELDS)
        assert not named or comment.strip(), f"{name}: {sorted(named)} without a source on its line"
        if depth <= 0:
            break
        i += 1


def test_a_paper_preset_without_a_recipe_field_is_refused_naming_the_module_and_the_field():
    mod = types.SimpleNamespace(__name__="mymodel", PRESETS={"paper": dict(lr=1e-3, batch_size=8, epochs=1, clip=0.0,
                                                                            schedule="plateau", lr_factor=0.5)})
    with pytest.raises(SystemExit, match=r"mymodel.PRESETS\['paper'\] does not set ema, lr_patience, lr_threshold"):
        train.paper_recipe(mod)


def test_a_recipe_flag_beats_the_preset_which_beats_the_paper_recipe(monkeypatch):
    monkeypatch.setitem(mac.PRESETS, "short", dict(epochs=3, clip=1.0))  # a preset that names part of a recipe

    def recipe(*argv):
        return train.resolve_configs(*train.parse_args(argv), lambda *a: None)[0]["recipe"]

    paper = mac.PRESETS["paper"]
    assert recipe("mac", "--preset", "paper").epochs == paper["epochs"]
    assert recipe("mac", "dact", "--preset", "paper").epochs == dact.PRESETS["paper"]["epochs"]  # the wrapper's paper
    r = recipe("mac", "dact", "--preset", "short")
    assert (r.epochs, r.clip, r.lr, r.ema) == (3, 1.0, paper["lr"], paper["ema"])  # the preset, then the paper's
    r = recipe("mac", "dact", "--preset", "short", "--epochs", "2", "--lr", "5e-3")
    assert (r.epochs, r.clip, r.lr, r.ema) == (2, 1.0, 5e-3, paper["ema"])  # then the flags


def test_a_checkpoint_from_before_the_recipe_config_resumes_with_its_own_recipe(tiny_data, tmp_path, capsys):
    own = dict(epochs=2, lr=3e-3, clip=2.0, ema=0.99, schedule="cosine", lr_patience=5)  # neither paper nor laptop
    train_mac(tiny_data, tmp_path, *[f for k, v in own.items() for f in (f"--{k.replace('_', '-')}", str(v))],
              "--iters", "2")
    ckpt = load(tmp_path / "last.pt")
    ckpt["config"]["train"].update(ckpt["config"].pop("recipe"))  # the layout of a checkpoint written before Recipe
    train.save_checkpoint(tmp_path / "last.pt", {k: v for k, v in ckpt.items() if k != "digest"})
    train.main(["mac", "--out", str(tmp_path), "--resume", "--iters", "3"])
    recipe = load(tmp_path / "last.pt")["config"]["recipe"]
    assert {k: recipe[k] for k in own} == own and recipe["batch_size"] == 16
    capsys.readouterr()
    train.main(["mac", "--init", str(tmp_path / "prev.pt"), "--eval-only"])  # the old checkpoint, kept as prev.pt
    assert f"recipe: {train.Recipe(**recipe)}" in capsys.readouterr().out.splitlines()


def test_compile_without_a_cpp_compiler_runs_uncompiled_with_a_message(monkeypatch):
    said = []
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    assert not train.can_compile(torch.device("cpu"), said.append)
    assert "no C++ compiler" in said[0] and "running uncompiled" in said[0]
    assert train.can_compile(torch.device("cuda", 0), said.append) and len(said) == 1  # CUDA: Triton, not a C++ compiler
    monkeypatch.setattr(train.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert train.can_compile(torch.device("cpu"), said.append)


def test_a_compiled_run_trains_as_the_eager_one(tiny_data, tmp_path):
    """--compile changes the speed, not the model: the same loss at every logged iteration up to float
    rounding (without dropout, whose compiled random stream is another)."""
    no_dropout = [f for part in ("stem", "question", "memory", "output", "read") for f in (f"--{part}-dropout", "0")]
    flags = ["--iters", "5", "--max-steps", "1", "--threads", "1", *no_dropout]
    eager = train_mac(tiny_data, tmp_path / "eager", *flags)
    compiled = train_mac(tiny_data, tmp_path / "compiled", *flags, "--compile")
    losses = [[r["loss"] for r in records(run) if r["split"] == "train"] for run in (tmp_path / "eager",
                                                                                  tmp_path / "compiled")]
    assert len(losses[0]) >= 1 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert compiled["final_acc"] == pytest.approx(eager["final_acc"], abs=0.02)
