"""The best checkpoint, not the last: train.keep_top_k keeps the k checkpoints best by train.checkpoint_metric
beside the latest, train.export best loads the best one's weights at the end, a resume keeps the ranking, and a
process killed while pruning leaves a usable best and a usable latest.

The metric comes through Session.evaluator, the hook a stage's eval part sets: here a table of values by step, so
which step is best is known in advance and does not depend on sampling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from components.config import Invalid, UserError
from components.models import load_model, load_tokenizer
from components.training import distributed
from components.training.batching import encode_example
from components.training.config import TrainConfig
from components.training.loop import Session, step_indices

METRIC = "eval/arith/accuracy"
VALUES = {2: 0.50, 4: 0.90, 6: 0.30, 8: 0.40, 10: 0.20}  # step 4 is best, the last step (10) is not


class Stop(Exception):
    pass


def train(cfg: TrainConfig, model, tok, out, *, values=VALUES, stop_after: int | None = None,
          critic=None) -> Session:
    """A plain SFT loop on the Session; the evaluator reports values[steps done] at every even step. `critic`: a
    companion model (as PPO's critic) trained on the same loss by its own engine."""
    examples = [encode_example(tok, f"{a}+{b}=", str(a + b)) for a in range(8) for b in range(8)]
    session = Session(cfg, model, out, companions={"critic": (critic, cfg)} if critic is not None else None)
    session.evaluator = lambda done: {METRIC: values[done]} if done in values else {}
    session.weights, session.critic_weights = {}, {}
    for step in range(session.start_step, cfg.max_steps):
        batch = [examples[i] for i in step_indices(len(examples), cfg.batch_size, step, cfg.seed)]
        batches = session.micro_batches(batch, tok.pad_token_id)
        normalizer = sum(float(b.loss_mask.sum()) for b in batches)

        def loss_fn(index, micro_batch):
            logprobs, _ = session.forward(model, micro_batch)
            return -(logprobs * micro_batch.loss_mask).sum() / normalizer, {}
        result = session.optimize(batches, loss_fn)
        if critic is not None:
            session.optimize(batches, lambda index, micro_batch: (-(session.forward(critic, micro_batch)[0] *
                                                                    micro_batch.loss_mask).sum() / normalizer, {}),
                             engine="critic")
            session.critic_weights[step + 1] = _copy(critic)
        session.record(step, result, normalizer, [len(e) for e in batch], 1.0)
        session.weights[step + 1] = _copy(model)
        session.maybe_checkpoint(step)
        if stop_after == step + 1:
            raise Stop
    session.finish()
    return session


def _copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 10, "batch_size": 8, "token_budget": 128, "lr": 3e-3, "checkpoint_every": 2,
                          "keep_checkpoints": 1, "keep_top_k": 1, "checkpoint_metric": METRIC, "export": "best",
                          "seed": 1, **kw})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_export_best_outputs_the_best_step_and_keeps_it_beside_the_latest(tiny_model_dir, tmp_path):
    """PPO's shape: a companion (critic) beside the policy; both are pruned together and both come from the
    exported step."""
    tok, model, critic = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir), load_model(tiny_model_dir)
    session = train(_cfg(), model, tok, tmp_path, critic=critic)
    assert _checkpoints(tmp_path) == ["critic-step-00000004", "critic-step-00000008", "step-00000004",
                                      "step-00000008"]  # the best and the latest, each with its critic
    assert session.exported == {"export_step": 4, "export_metric": METRIC, "export_value": 0.9}
    assert _same(model.state_dict(), session.weights[4]) and not _same(session.weights[4], session.weights[10])
    assert _same(critic.state_dict(), session.critic_weights[4])
    # what a kill between renaming step-N and its critic leaves: a critic whose step is gone, and a renamed one
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "critic-step-00000004", root / "critic-step-00000006")
    (root / ".pruned-critic-step-00000002").mkdir()
    resumed = Session(_cfg(), load_model(tiny_model_dir), tmp_path,
                      companions={"critic": (load_model(tiny_model_dir), _cfg())})
    assert resumed.start_step == 8 and _checkpoints(tmp_path) == ["critic-step-00000004", "critic-step-00000008",
                                                                  "step-00000004", "step-00000008"]
    meta = distributed.read_meta(tmp_path / "checkpoints" / "step-00000004")
    assert meta["step"] == 4 and meta["metrics"][METRIC] == 0.9
    assert distributed.checkpoint_problem(tmp_path / "checkpoints" / "step-00000004") is None  # meta.json summed


def test_export_last_a_tie_min_mode_and_a_nan(tiny_model_dir, tmp_path, caplog):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    session = train(_cfg(export="last"), model, tok, tmp_path / "last")
    assert session.exported == {} and _same(model.state_dict(), session.weights[10])
    assert _checkpoints(tmp_path / "last") == ["step-00000004", "step-00000008"]  # keep_top_k still ranks
    model = load_model(tiny_model_dir)
    session = train(_cfg(), model, tok, tmp_path / "tie", values={**VALUES, 10: 0.9})  # a tie: the later step
    assert session.exported["export_step"] == 10 and _same(model.state_dict(), session.weights[10])
    model = load_model(tiny_model_dir)
    session = train(_cfg(checkpoint_mode="min"), model, tok, tmp_path / "min", values={**VALUES, 6: 0.1})
    assert session.exported["export_step"] == 6 and _same(model.state_dict(), session.weights[6])
    assert _checkpoints(tmp_path / "min") == ["step-00000006", "step-00000008"]
    model = load_model(tiny_model_dir)
    with caplog.at_level("WARNING", logger="components.training.loop"):
        session = train(_cfg(), model, tok, tmp_path / "nan", values={**VALUES, 4: float("nan")})
    assert any("step 4: eval/arith/accuracy is nan: its checkpoint is kept unranked" in r.getMessage()
               for r in caplog.records)
    assert session.exported["export_step"] == 2 and _checkpoints(tmp_path / "nan") == ["step-00000002",
                                                                                        "step-00000008"]


def test_a_resume_keeps_the_ranking(tiny_model_dir, tmp_path):
    """Stopped after step 7 (checkpoints: best 4, latest 6), resumed: step 8's checkpoint must lose to step 4's,
    read back from disk, and step 4 is exported with the uninterrupted run's weights."""
    tok = load_tokenizer(tiny_model_dir)
    full = train(_cfg(), load_model(tiny_model_dir), tok, tmp_path / "full")
    with pytest.raises(Stop):
        train(_cfg(), load_model(tiny_model_dir), tok, tmp_path / "cut", stop_after=7)
    model = load_model(tiny_model_dir)
    resumed = train(_cfg(), model, tok, tmp_path / "cut")
    assert resumed.start_step == 6 and resumed.exported["export_step"] == 4
    assert _checkpoints(tmp_path / "cut") == ["step-00000004", "step-00000008"]
    assert _same(model.state_dict(), full.weights[4])


KILLED_WHILE_PRUNING = """
import os, shutil, signal, sys
sys.path.insert(0, sys.argv[3])
from tests.integration.test_best_checkpoint import _cfg, train
from components.models import load_model, load_tokenizer
from components.training import loop

real, deletions = shutil.rmtree, [0]
def rmtree(path, *args, **kwargs):
    if loop.TRASH in str(path) and os.path.exists(path) and (deletions.__setitem__(0, deletions[0] + 1) or
                                                             deletions[0] == int(sys.argv[4])):
        os.remove(os.path.join(path, "state.pt"))  # part of the pruned checkpoint deleted, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
loop.shutil.rmtree = rmtree
tok, model = load_tokenizer(sys.argv[1]), load_model(sys.argv[1])
train(_cfg(), model, tok, sys.argv[2])
"""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_kill_during_the_prune_leaves_a_usable_best_and_latest(tiny_model_dir, tmp_path, kill_at):
    """SIGKILL in the middle of deleting a pruned checkpoint: the 1st prune (step 2, at step 4, the best and the
    latest) or the 2nd (step 6, at step 8: best 4, latest 8). The kept checkpoints are whole, the half-deleted one
    no longer looks like a checkpoint, and the next start removes it, resumes from the latest and still exports
    the best."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_PRUNING, str(tiny_model_dir), str(tmp_path),
                           str(root), str(kill_at)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = _checkpoints(tmp_path)
    leftovers = [n for n in names if n.startswith(".pruned-")]
    checkpoints = [n for n in names if n.startswith("step-")]
    assert leftovers == [f".pruned-step-0000000{ {1: 2, 2: 6}[kill_at]}"]  # killed mid-delete: renamed first
    assert checkpoints == (["step-00000004"] if kill_at == 1 else ["step-00000004", "step-00000008"])
    for name in checkpoints:
        assert distributed.checkpoint_problem(tmp_path / "checkpoints" / name) is None, name
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    session = train(_cfg(), model, tok, tmp_path)
    assert session.start_step == int(checkpoints[-1].split("-")[1])
    assert _checkpoints(tmp_path) == ["step-00000004", "step-00000008"]
    assert session.exported["export_step"] == 4


def test_ranking_settings_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(Invalid, match="checkpoint_metric"):
        TrainConfig(checkpoint_every=2, export="best", keep_top_k=1)
    with pytest.raises(Invalid, match="checkpoint_every"):
        TrainConfig(keep_top_k=1, checkpoint_metric=METRIC)
    with pytest.raises(Invalid, match="keep_top_k"):
        TrainConfig(checkpoint_every=2, export="best", checkpoint_metric=METRIC)
    with pytest.raises(Invalid, match="export"):
        TrainConfig(export="final")
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(UserError, match=r"step 2: train.checkpoint_metric eval/arith/accuracy is not in the step's"):
        train(_cfg(), load_model(tiny_model_dir), tok, tmp_path, values={4: 0.1})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
