"""train.py refuses bad settings with a message, never a traceback: every flag and every config read from a
checkpoint goes through one table of rules (train.RULES, train.check_configs), and the pairs of options that
cannot go together are refused before anything runs (CPU, seconds).

Same tiny MAC on the tiny built-in mini-CLEVR as tests/test_train.py.
"""
import math

import pytest
import torch

import train

pytestmark = pytest.mark.robustness  # bad input: `pytest -m "not robustness"` skips these

TINY = ["--dim", "16", "--embed-dim", "8", "--max-steps", "2", "--pixel-channels", "8", "8",
        "--batch-size", "16", "--log-every", "5", "--threads", "1"]


def error_of(argv):
    """The message of the SystemExit that train.main(argv) must raise."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """A run stopped after 2 iterations, inside its first epoch."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train.main(["mac", "--data", str(tiny_data), "--out", str(out), *TINY, "--iters", "2"])
    return out


# ----------------------------------------------------------------------------------------------------
# Flags: each value against train.RULES (and its field's type), before any data is read or file written

@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0: batch_size must be an integer >= 1"),
    (["--log-every", "0"], "--log-every 0: log_every must be an integer >= 1"),
    (["--lr", "nan"], "--lr nan: lr must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf: lr must be a finite number > 0"),
    (["--lr-factor", "2"], "lr_factor must be a finite number between 0 and 1"),
    (["--lr-factor", "0"], "lr_factor must be a finite number between 0 and 1"),
    (["--dim", "0"], "--dim 0: dim must be an integer >= 2 and even"),
    (["--dim", "7"], "--dim 7: dim must be an integer >= 2 and even"),
    (["--embed-dim", "0"], "--embed-dim 0: embed_dim must be an integer >= 1"),
    (["--max-steps", "0"], "--max-steps 0: max_steps must be an integer >= 1"),
    (["--pixel-channels", "8", "0"], "--pixel-channels 8 0: pixel_channels must be a list of ints"),
    (["--stem-dropout", "1"], "stem_dropout must be a finite number >= 0 and < 1"),
    (["--epochs", "-1"], "--epochs -1: epochs must be an integer >= 0"),
    (["--iters", "-1"], "--iters -1: iters must be an integer >= 0"),
    (["--ckpt-every", "-4"], "ckpt_every must be an integer >= 0"),
    (["--seed", "-1"], "--seed -1: seed must be an integer >= 0"),
    (["--ema", "1"], "--ema 1.0: ema must be a finite number >= 0 and < 1"),
    (["--clip", "-1"], "--clip -1.0: clip must be a finite number >= 0"),
    (["--lr-patience", "-2"], "lr_patience must be an integer >= 0"),
])
def test_a_bad_flag_value_is_refused_with_the_rule(tiny_data, tmp_path, flags, message):
    msg = error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TINY, "--iters", "1", *flags])
    assert message in msg
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.parametrize("argv, message", [
    (["mac", "dact", "--tau", "nan"], "--tau nan: tau must be a finite number >= 0"),
    (["mac", "act", "--halt-eps", "0"], "halt_eps must be a finite number between 0 and 1"),
    (["mac", "dact", "--halt-max-steps", "5"], "--halt-max-steps 5, but the inner model has 2 steps"),  # two settings
    (["stack_nmn", "--sharpen-temp", "0"], "--sharpen-temp 0.0: sharpen_temp must be a finite number > 0"),
    (["lnmn", "--held-out", "1"], "held_out must be a finite number >= 0 and < 1"),
    (["pg_ee", "--reward-decay", "2"], "reward_decay must be a finite number from 0 to 1"),
])
def test_the_rules_apply_to_every_config_with_the_field(tiny_data, tmp_path, argv, message):
    sizes = TINY if argv[0] == "mac" else ["--batch-size", "16", "--threads", "1"]  # refused before any is built
    assert message in error_of([*argv, "--data", str(tiny_data), "--out", str(tmp_path / "run"), *sizes, "--iters", "1"])


def test_every_rule_names_a_field_of_some_config():
    import act, dact, lnmn, mac, pg_ee, stack_nmn
    fields = {f for cls in (train.TrainConfig, train.Recipe, mac.Config, stack_nmn.Config, lnmn.Config, pg_ee.Config,
                            act.Config, dact.Config) for f in cls.__dataclass_fields__}
    assert set(train.RULES) <= fields, set(train.RULES) - fields  # a misspelt rule would check nothing


@pytest.mark.parametrize("model, wrapper", [("pg_ee", "act"), ("pg_ee", "dact"), ("lnmn", "act"), ("lnmn", "dact")])
def test_a_model_without_the_step_protocol_is_not_offered_a_wrapper(model, wrapper, capsys):
    msg = error_of([model, wrapper, "--iters", "1"])
    assert f"{wrapper} cannot wrap {model}" in msg and "it wraps mac, stack_nmn" in msg
    with pytest.raises(SystemExit):
        train.main([model, "-h"])
    assert f"usage: train.py {model} [flags]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["-h"])
    assert "wrappers: act, dact (around mac, stack_nmn)" in capsys.readouterr().out


def test_out_naming_a_file_is_refused(tiny_data, tmp_path):
    (tmp_path / "file").write_text("kept")
    msg = error_of(["mac", "--data", str(tiny_data), "--out", str(tmp_path / "file"), *TINY, "--iters", "1"])
    assert "is a file, not a directory" in msg and (tmp_path / "file").read_text() == "kept"


# ----------------------------------------------------------------------------------------------------
# Configs read from checkpoints: the same rules, and the message names the checkpoint and the flag to pass

@pytest.mark.parametrize("part, field, value, need", [
    ("recipe", "lr", math.nan, "lr must be a finite number > 0"),
    ("recipe", "batch_size", 0, "batch_size must be an integer >= 1"),
    ("recipe", "schedule", "weekly", "schedule must be one of plateau, cosine"),
    ("train", "seed", -1, "seed must be an integer >= 0"),
    ("model", "dim", 7, "dim must be an integer >= 2 and even"),
    ("model", "dim", "16", "dim must be an integer"),
    ("model", "pixel_channels", 8, "pixel_channels must be a list of ints"),
    ("model", "self_attention", "yes", "self_attention must be true or false"),
])
@pytest.mark.parametrize("how", ["--resume", "--init --eval-only"])
def test_a_bad_value_in_a_checkpoints_config_is_refused(run_dir, tmp_path, part, field, value, need, how):
    ckpt = load(run_dir / "last.pt")
    ckpt["config"][part][field] = value
    bad = tmp_path / "run"
    bad.mkdir()
    train.save_checkpoint(bad / "last.pt", {k: v for k, v in ckpt.items() if k != "digest"})  # a valid digest
    argv = ["--out", str(bad), "--resume"] if how == "--resume" else ["--init", str(bad / "last.pt"), "--eval-only"]
    msg = error_of(["mac", *argv])
    assert f"checkpoint {bad / 'last.pt'} sets {field} = {value!r} in its {part} config" in msg and need in msg
    assert f"pass --{field.replace('_', '-')} with a good value" in msg


# ----------------------------------------------------------------------------------------------------
# Options that do not go together, and data with nothing to train on

def test_init_together_with_resume_is_refused(run_dir):
    msg = error_of(["mac", "--out", str(run_dir), "--resume", "--init", str(run_dir / "last.pt")])
    assert "--init and --resume together" in msg and "Pass one of them" in msg


def test_a_mid_epoch_resume_with_another_batch_size_is_refused_with_the_fix(run_dir, tmp_path):
    assert load(run_dir / "last.pt")["pos"] == 2  # stopped inside epoch 1
    msg = error_of(["mac", "--out", str(run_dir), "--resume", "--batch-size", "8"])
    assert "stopped inside epoch 1, after 2 batches of 16" in msg
    n = len(train.data.make_loader(load(run_dir / "last.pt")["config"]["train"]["data"], "train", 16, shuffle=True))
    assert f"--resume --iters {n}; then --resume --batch-size 8" in msg  # the iteration that ends epoch 1


def altered(tiny_data, dst, split, cut):
    """A copy of the prepared tiny data whose `split` has no questions (cut "rows") or no answers ("answers")."""
    import shutil
    import h5py
    shutil.copytree(tiny_data, dst)
    with h5py.File(dst / f"{split}_questions.h5", "r+") as f:
        for name in list(f):
            rows = f[name][:0] if cut == "rows" else f[name][:]
            del f[name]
            if not (cut == "answers" and name == "answers"):
                f.create_dataset(name, data=rows)
    return dst


@pytest.mark.parametrize("split, cut, message", [
    ("train", "rows", "train_questions.h5: no questions"),  # (data.py refuses an empty questions file)
    ("val", "answers", "the val split of"),  # questions without answers, as CLEVR's test split
])
def test_a_split_without_questions_or_answers_is_refused(tiny_data, tmp_path, split, cut, message):
    data_dir = altered(tiny_data, tmp_path / "data", split, cut)
    msg = error_of(["mac", "--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1"])
    assert message in msg


def test_a_model_that_keeps_no_training_question_is_refused(tiny_data, tmp_path):
    msg = error_of(["lnmn", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--map-dim", "8", "--dim", "16",
                    "--embed-dim", "8", "--kb-dim", "8", "--pe-dim", "4", "--mem-dim", "8", "--out-dim", "16",
                    "--batch-size", "16", "--held-out", "0.999", "--epochs", "1"])  # LNMN's alphas get every row
    assert "nothing to train on" in msg and "the model trains on 0" in msg
