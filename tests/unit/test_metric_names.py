"""Where a stage says its metrics have TRL's names, they do (components/trl_names.py).

- each stage logs every name its table lists, on a one-step run on the tiny model;
- each name is in the source of the TRL trainer the table names, in the installed TRL (the `bench` extra's pin);
- each stage's README calls exactly its table's names TRL's: the sentence that says "with TRL's names" lists
  them all and nothing else.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import trl

from components import stages
from components.config import from_mapping
from components.trl_names import PPO_TRL_VERSION, TRL_NAMES, TRL_TRAINERS, TRL_VERSION

REPO = Path(__file__).resolve().parents[2]
TRL_ROOT = Path(trl.__file__).resolve().parent.parent
REWARD = "task"  # the reward function of the grpo and ppo runs: <fn> in their names


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _settings(name: str, data: Path) -> dict:
    """A one-step run of stage `name` on the tiny model (without model and output_dir)."""
    train = {"max_steps": 1, "batch_size": 4, "log_every": 1}
    prompts = {"prompts": {"task": "arithmetic", "task_rows": 8}, "sampling": {"max_new_tokens": 4}}
    if name == "grpo":
        return {**prompts, "prompts_per_round": 2, "num_generations": 2, "beta": 0.1, "rewards": [{"name": REWARD}],
                "train": train}
    if name == "ppo":
        return {**prompts, "rewards": [{"name": REWARD}], "critic_init": "policy", "ppo_epochs": 1,
                "num_minibatches": 1, "kl_coef": 0.1, "train": train}
    if name in ("dpo", "reward_model"):
        pairs = _jsonl(data / "pairs.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                                              for a in range(6) for b in range(4)])
        return {"train_data": pairs, "train": train, **({"eval_fraction": 0.25} if name == "reward_model" else {})}
    rows = _jsonl(data / "sft.jsonl", [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(8)])
    return {"train_data": rows, "train": train, **stages.get(name).fixed}


@pytest.mark.parametrize("name", sorted(TRL_NAMES))
def test_each_stage_logs_its_trl_names(name, tiny_model_dir, tmp_path):
    stage = stages.get(name)
    cfg = from_mapping(stage.config_class(), {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
                                              **_settings(name, tmp_path)})
    importlib.import_module(stage.main).run(cfg)
    logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    missing = sorted(key.replace("<fn>", REWARD) for key in TRL_NAMES[name]
                     if key.replace("<fn>", REWARD) not in logged)
    assert not missing, f"{name} does not log {missing} (it logs {sorted(logged)})"


def _source_pattern(key: str) -> re.Pattern:
    """The name as a string literal of TRL's source; <fn> is an f-string field there."""
    return re.compile('"' + re.escape(key).replace(re.escape("<fn>"), r"\{[A-Za-z_]+\}") + '"')


def test_the_installed_trl_is_the_one_the_names_were_checked_with():
    assert trl.__version__ == TRL_VERSION, (f"trl {trl.__version__} is installed, components/trl_names.py names TRL "
                                            f"{TRL_VERSION}: check its names against this one and update it")
    pin = re.search(r'"trl==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and pin.group(1) == TRL_VERSION


@pytest.mark.parametrize("trainer", sorted(TRL_TRAINERS))
def test_the_names_are_in_the_trl_trainer_source(trainer):
    source = TRL_ROOT / TRL_TRAINERS[trainer]
    names = sorted({key for table in TRL_NAMES.values() for key, who in table.items() if who == trainer})
    assert names, f"no stage names a metric of {trainer}"
    if trainer == "PPOTrainer":
        # TRL_VERSION has no PPO trainer: the names are those of PPO_TRL_VERSION, as the ppo README says; should
        # the installed TRL have one again, its names are checked like the others'
        readme = (REPO / "components" / "ppo" / "README.md").read_text()
        assert f"PPOTrainer of TRL {PPO_TRL_VERSION.rsplit('.', 1)[0]}" in readme
        if not source.exists():  # TRL 1.9.0's lines that log them, copied verbatim (the file names the commit)
            source = REPO / "tests" / "unit" / "upstream" / f"trl-v{PPO_TRL_VERSION}-ppo_trainer-metrics.py.txt"
    text = source.read_text()
    absent = [key for key in names if not _source_pattern(key).search(text)]
    assert not absent, f"{source} logs no metric named {absent}"


def _claimed(readme: Path) -> list[str]:
    """The backquoted names of the README's sentence that says "with TRL's names"."""
    text = " ".join(readme.read_text().split())
    start = text.find("with TRL's names")
    assert start >= 0, f"{readme}: no sentence says which metrics have TRL's names"
    end = re.compile(r"\.(\s|$)").search(text, start)
    return re.findall(r"`([^`]+)`", text[start:end.start() if end else len(text)])


@pytest.mark.parametrize("module", sorted({stages.get(name).module for name in TRL_NAMES}))
def test_each_readme_calls_exactly_the_table_names_trl(module):
    readme = REPO / "components" / module / "README.md"
    table = {key for name in TRL_NAMES if stages.get(name).module == module for key in TRL_NAMES[name]}
    claimed = _claimed(readme)
    assert sorted(set(claimed)) == sorted(table), (f"{readme} calls {sorted(set(claimed) - table)} TRL's names and "
                                                   f"leaves out {sorted(table - set(claimed))}")
