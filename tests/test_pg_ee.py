"""Tests for pg_ee.py: REINFORCE ignores what follows <END>, the PG overfits a batch, topological and
per-example execution answer alike (and exec offers only those two), the three stages run through
train.py, the seeded program subset (CPU, seconds). Prefix <-> tree round trips of generated programs
are in test_data.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import pg_ee
import topo_exec
import train
from pg_ee import END, NULL, START

TINY = dict(embed_dim=8, hidden_dim=16, module_dim=4, classifier_proj_dim=8, classifier_fc_dim=16)
TINY_FLAGS = ["--embed-dim", "8", "--hidden-dim", "16", "--module-dim", "4", "--classifier-proj-dim", "8",
              "--classifier-fc-dim", "16", "--batch-size", "16", "--log-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def info(tiny_data):
    return data.load_info(tiny_data)


@pytest.fixture(scope="module")
def batch(tiny_data):
    split = data.Split(tiny_data, "train")
    return split.batch(np.arange(12))


def model(info, **kw):
    torch.manual_seed(0)
    return pg_ee.PGEE(pg_ee.PGEEConfig(**{**TINY, **kw}), info)


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# REINFORCE

def test_reinforce_ignores_tokens_after_end():
    torch.manual_seed(0)
    V = 8
    tokens = torch.tensor([[5, 6, END, 7, 5, 6],      # ends at 2: tokens 3..5 are no actions
                           [5, END, END, 4, 4, 4],    # a second <END> after the first is ignored too
                           [4, 5, 6, 7, 4, 5]])       # never ends: every token counts
    logits = torch.randn(3, 6, V, requires_grad=True)
    advantage = torch.tensor([0.7, -0.4, 0.3])
    loss = pg_ee.reinforce_loss(logits, tokens, advantage)
    grad, = torch.autograd.grad(loss, logits)
    counted = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert (grad.abs().sum(-1) > 0).eq(counted).all()
    # the value is REINFORCE's: -mean advantage * sum of the counted log-probs
    log_p = logits.log_softmax(-1).gather(2, tokens[..., None])[..., 0]
    assert torch.allclose(loss, -(advantage * (log_p * counted).sum(1)).mean())
    # other tokens after <END> change nothing
    other = tokens.clone()
    other[~counted] = 3
    assert torch.allclose(pg_ee.reinforce_loss(logits, other, advantage), loss)


def test_joint_step_trains_the_pg_by_reinforce_and_the_ee_by_its_answers(info, batch):
    m = model(info, stage="joint").train()
    m.baseline.fill_(0.5)  # an untrained EE is always wrong: a zero baseline would leave no advantage
    out = m(batch)
    assert out["aux_loss"].requires_grad and set(out["metrics"]) == {"program_acc", "reward"}
    reward = (out["log_probs"].argmax(1) == batch["answer"]).float()
    assert torch.allclose(m.baseline, 0.45 + 0.1 * reward.mean())  # b <- 0.9 b + 0.1 mean(reward)
    pg_grads = torch.autograd.grad(out["aux_loss"], list(m.pg.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in pg_grads)
    nll = F.nll_loss(out["log_probs"], batch["answer"])
    ee_grads = torch.autograd.grad(nll, list(m.ee.parameters()))
    assert all(torch.isfinite(g).all() for g in ee_grads) and any(g.abs().sum() > 0 for g in ee_grads)


def test_reinforce_through_the_decoder_raises_the_expected_reward(info, batch):
    # the policy-gradient invariant, end to end through sampling: reward 1 when a program starts with a
    # chosen token; a few REINFORCE steps make that token the likely one
    m = model(info, stage="joint")
    question, lens = batch["question"][:1].expand(64, -1), batch["question_len"][:1].expand(64)
    target = info["program_tokens"].index("count")

    def p_target():
        with torch.no_grad():
            start = torch.full((1, 1), START)
            return m.pg.step_logits(m.pg.encode(question[:1], lens[:1]), start)[0][0, 0].softmax(-1)[target].item()
    before = p_target()
    opt = torch.optim.Adam(m.pg.parameters(), 3e-2)
    for _ in range(40):
        tokens, logits = m.pg.decode(m.pg.encode(question, lens), 3, sample=True)
        reward = (tokens[:, 0] == target).float()
        loss = pg_ee.reinforce_loss(logits, tokens, reward - reward.mean())
        opt.zero_grad(), loss.backward(), opt.step()
    assert before < 0.05 and p_target() > 0.9, (before, p_target())


def test_decoder_never_emits_special_tokens_but_end(info, batch):
    m = model(info, stage="joint")
    enc = m.pg.encode(batch["question"], batch["question_len"])
    tokens, logits = m.pg.decode(enc, 12, sample=True)
    assert not torch.isin(tokens, torch.tensor([NULL, START, data.UNK])).any()
    assert logits.shape == (*tokens.shape, len(info["program_tokens"]))


# ----------------------------------------------------------------------------------------------------
# Program generator

def test_program_match_reads_up_to_end():
    target = torch.tensor([[START, 5, 6, END, NULL], [START, 5, 6, END, NULL], [START, 5, 6, END, NULL]])
    pred = torch.tensor([[5, 6, END, 7, 7, 7],  # right, junk after <END>
                         [5, 6, 7, END, 7, 7],  # one token too many
                         [5, 6, 6, 6, 6, 6]])   # never ends
    assert pg_ee.program_match(pred, target).tolist() == [True, False, False]


def test_pg_overfits_a_batch(info, batch):
    m = model(info, stage="pg", embed_dim=32, hidden_dim=64)
    opt = torch.optim.Adam(m.pg.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        out = m.train()(batch)
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.05 * first
    with torch.no_grad():
        ev = m.eval()(batch)  # greedy decoding, answers through the EE on the decoded programs
    assert ev["metrics"]["program_acc"].mean() == 1.0
    assert ev["log_probs"].shape == (len(batch["answer"]), info["num_answers"])


def test_pg_stage_leaves_the_ee_untouched(info, batch):
    m = model(info, stage="pg")
    out = m.train()(batch)
    out["loss"].backward()
    assert all(p.grad is None for p in m.ee.parameters())
    assert any(p.grad is not None for p in m.pg.parameters())


def test_program_subset_is_seeded_random_not_the_first(info):
    a = model(info, stage="pg", num_programs=50).train_subset(1000)
    assert len(a) == len(set(a.tolist())) == 50 and a.max() >= 50  # not rows 0..49
    assert (model(info, stage="pg", num_programs=50).train_subset(1000) == a).all()
    assert (model(info, stage="pg", num_programs=50, program_seed=1).train_subset(1000) != a).any()
    assert model(info, stage="ee", num_programs=50).train_subset(1000) is None
    with pytest.raises(data.DataError, match="num-programs"):
        model(info, stage="pg", num_programs=2000).train_subset(1000)


def test_program_subset_is_not_the_head_of_the_trainers_first_epoch(info):
    # NumPy seeds default_rng(s) as default_rng([s, 0]), data.Loader's epoch-0 order: a subset drawn from
    # the same seed would be the first questions the next stage trains on (the PG's own, in the joint stage)
    class Rows:
        def __len__(self):
            return 1000

        def batch(self, idx):
            return idx
    first = np.concatenate(list(data.Loader(Rows(), 50, shuffle=True, seed=0)))[:50]
    subset = model(info, stage="pg", num_programs=50).train_subset(1000)
    assert len(np.intersect1d(first, subset)) < 10  # 2.5 expected by chance; 50 before the fix


# ----------------------------------------------------------------------------------------------------
# Execution engine

def execute_with_schedule(m, image, program, schedule):
    """m's EE with one of topo_exec.py's benchmark schedules in place of its own executor."""
    programs, bank = topo_exec.decode(program, m.idx_to_token), m.ee.bank
    feats = m.ee.stem(image)                                             # (B, C, H, W)
    if schedule == "level":                                              # one call per (height, architecture)
        roots = topo_exec.run_level(topo_exec.make_plan(programs, bank, "height"), bank, feats)
    else:                                                                # agenda: one module per level
        roots = topo_exec.run_topo(topo_exec.make_plan(programs, bank, "agenda"), bank, feats)
    return m.ee.classifier(roots).log_softmax(-1)                        # (B, A)


@pytest.mark.parametrize("batched", ["topo", "agenda", "level"])
def test_batched_and_naive_execution_give_the_same_answers(info, batch, batched):
    # the model's exec is topo or naive; agenda and level, topo_exec.py's benchmark schedules, run the
    # same EE's modules here, so that every schedule is checked against the per-example recursion
    topo = model(info, stage="ee", exec="topo").double()
    naive = model(info, stage="ee", exec="naive").double()
    naive.load_state_dict(topo.state_dict())
    image = batch["image"].double().requires_grad_()
    if batched == "topo":
        a = topo.execute(image, batch["program"])
    else:
        a = execute_with_schedule(topo, image, batch["program"], batched)
    b = naive.execute(image, batch["program"])
    assert torch.allclose(a, b, atol=1e-10) and (a.argmax(1) == b.argmax(1)).all()
    ga = torch.autograd.grad(a[:, 0].sum(), [image, *topo.parameters()], allow_unused=True)
    gb = torch.autograd.grad(b[:, 0].sum(), [image, *naive.parameters()], allow_unused=True)
    zero = lambda g, p: torch.zeros_like(p) if g is None else g          # level: unused modules get zeros
    params = [image, *topo.parameters()]
    assert all(torch.allclose(zero(x, p), zero(y, p), atol=1e-10) for x, y, p in zip(ga, gb, params))


def test_exec_is_topo_or_naive(info, batch, tiny_data, tmp_path, monkeypatch):
    run_topo, run_naive, calls = topo_exec.run_topo, topo_exec.run_naive, []
    monkeypatch.setattr(topo_exec, "run_topo", lambda plan, *a: calls.append(plan.schedule) or run_topo(plan, *a))
    monkeypatch.setattr(topo_exec, "run_naive", lambda *a: calls.append("naive") or run_naive(*a))
    with torch.no_grad():
        model(info, stage="ee").execute(batch["image"], batch["program"])  # the default: batched by height
        model(info, stage="ee", exec="naive").execute(batch["image"], batch["program"])
    assert calls == ["height", "naive"]
    for schedule in ("agenda", "level", "postorder"):                    # benchmark schedules, not settings
        with pytest.raises(ValueError, match="benchmark"):
            model(info, stage="ee", exec=schedule)
    with pytest.raises(SystemExit):
        train.main(["pg_ee", "--exec", "agenda", "--iters", "1", "--data", str(tiny_data),
                    "--out", str(tmp_path / "run"), *TINY_FLAGS])


def test_classifier_is_sized_to_the_input_resolution(info):
    for shape in [(18, 6, 6), (1024, 14, 14)]:
        m = model({**info, "image_shape": shape}, stage="ee")
        exist, scene = info["program_tokens"].index("exist"), info["program_tokens"].index("scene")
        program = torch.tensor([[START, exist, scene, END]])
        assert m.execute(torch.randn(1, *shape), program).shape == (1, info["num_answers"])


# ----------------------------------------------------------------------------------------------------
# The three stages through the trainer

def test_each_stage_runs_from_the_cli(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), *TINY_FLAGS]
    ee = train.main(["pg_ee", "--stage", "ee", "--iters", "3", "--out", str(tmp_path / "ee"), *common])
    assert ee["final_acc"] is not None and "metrics" not in records(tmp_path / "ee")[-1]
    train.main(["pg_ee", "--stage", "pg", "--num-programs", "40", "--epochs", "1", "--init",
                str(tmp_path / "ee" / "last.pt"), "--out", str(tmp_path / "pg"), *common])
    tr, val = records(tmp_path / "pg")
    assert tr["n"] == 40 and "program_acc" in tr["metrics"] and "program_acc" in val["metrics"]
    pg_ckpt = torch.load(tmp_path / "pg" / "last.pt", map_location="cpu", weights_only=True)
    ee_ckpt = torch.load(tmp_path / "ee" / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, pg_ckpt["ema"][k]) for k, v in ee_ckpt["ema"].items() if k.startswith("ee."))
    train.main(["pg_ee", "--stage", "joint", "--exec", "naive", "--iters", "3", "--init",
                str(tmp_path / "pg" / "last.pt"), "--out", str(tmp_path / "joint"), *common])
    tr, val = records(tmp_path / "joint")
    assert set(tr["metrics"]) == {"program_acc", "reward"} and val["iter"] == 3


@pytest.mark.parametrize("stage,metric", [("pg", "program_acc"), ("ee", None)])
def test_the_plateau_schedule_follows_each_stages_own_val_metric(stage, metric, tiny_data, tmp_path, monkeypatch):
    """The pg stage does not move the answer accuracy (its EE is not trained): its schedule reads the
    program accuracy; the ee stage's reads the answer accuracy."""
    seen = []
    step = torch.optim.lr_scheduler.ReduceLROnPlateau.step
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step",
                        lambda self, value: (seen.append(value), step(self, value))[1])
    train.main(["pg_ee", "--stage", stage, "--epochs", "1", "--schedule", "plateau", "--out", str(tmp_path / stage),
                "--data", str(tiny_data), *TINY_FLAGS])
    val = records(tmp_path / stage)[-1]
    assert seen == [val["metrics"][metric] if metric else val["acc"]]
