"""PPO's passes over a round: each takes the round's samples in an order of its own (as TRL's PPOTrainer
reshuffles per epoch), drawn from the seed, the round and the pass, so a resumed run cuts its rounds as the
uninterrupted one did."""

from components.config import from_mapping
from components.ppo import main as ppo_main
from components.ppo.config import PPOConfig


def test_each_ppo_epoch_reshuffles_the_round(tiny_model_dir, tmp_path, monkeypatch):
    seen: list[list[int]] = []
    step = ppo_main.ppo_step

    def recording_step(cfg, session, actor, critic, rollout, minibatch, pad_id):
        seen.append(list(minibatch))
        return step(cfg, session, actor, critic, rollout, minibatch, pad_id)

    monkeypatch.setattr(ppo_main, "ppo_step", recording_step)
    settings = {"model": str(tiny_model_dir), "prompts": {"task": "arithmetic", "task_rows": 16},
                "sampling": {"max_new_tokens": 4}, "rewards": [{"name": "arithmetic"}], "critic_init": "policy",
                "ppo_epochs": 3, "num_minibatches": 2, "kl_coef": 0.0,
                "train": {"batch_size": 8, "lr": 1e-4, "max_steps": 6, "log_every": 1, "checkpoint_every": 0}}
    ppo_main.run(from_mapping(PPOConfig, {**settings, "output_dir": str(tmp_path)}))
    assert [len(m) for m in seen] == [4] * 6
    epochs = [seen[0] + seen[1], seen[2] + seen[3], seen[4] + seen[5]]
    assert all(sorted(epoch) == list(range(8)) for epoch in epochs)  # each pass takes every sample once
    splits = {frozenset(map(frozenset, seen[index:index + 2])) for index in (0, 2, 4)}
    assert len(splits) == 3  # and cuts it into minibatches of its own (a resume's sameness: test_ppo.py)
