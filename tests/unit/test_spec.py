"""The workflow spec: the bundled specs load, and every kind of mistake fails naming the key's path, the bad
value and what is allowed."""

import copy
import dataclasses

import pytest
import yaml

from pipelines.spec import SpecError, load_spec, parse_spec

# A valid spec with no stage that needs reward functions (they are checked by components.rewards).
BASE = {
    "name": "t",
    "base_model": "s3://posttrain-data/models/m",
    "data": {"sources": [{"task": "arithmetic", "rows": 100, "shape": "sft"}]},
    "stages": [{"stage": "psft", "settings": {"train": {"max_steps": 10, "lr": 0.001}}},
               {"stage": "evaluate"},
               {"stage": "register"}],
    "eval_suites": [{"task": "arithmetic", "split": "id"}, {"task": "arithmetic", "split": "ood"}],
    "promotion": {"metric": "arithmetic-id/accuracy", "guards": [{"metric": "arithmetic-ood/accuracy",
                                                                  "max_drop": 0.02}]},
}


def spec_error(tmp_path, change) -> str:
    """Write BASE changed by `change` to a file, load it, and return the SpecError's message."""
    data = copy.deepcopy(BASE)
    change(data)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    message = str(e.value)
    assert message.startswith(str(path) + ": "), message  # every error names the file first
    return message


def test_base_spec_is_valid():
    spec = parse_spec(copy.deepcopy(BASE))
    assert [s.stage for s in spec.stages] == ["psft", "evaluate", "register"]
    assert spec.tracking.experiment == "t" and spec.tracking.registered_model == "t"  # defaults: the name
    assert spec.stages[0].module == "sft"
    assert spec.runtime_defaults(spec.stages[0]) == {"lr": 0.001, "max_steps": 10}


@pytest.mark.parametrize("name", ["demo", "sft-psft", "compare", "rlhf-demo", "cluster"])
def test_bundled_specs_load_by_name(name):
    spec = load_spec(name)
    assert spec.stages and (spec.promotion is not None) == any(s.stage == "register" for s in spec.stages)


def test_cluster_spec_places_training_on_tainted_gpu_nodes():
    spec = load_spec("cluster")
    psft = spec.stages[0]
    res = spec.stage_resources(psft)
    assert spec.base_model.startswith("s3://") and [s.stage for s in spec.stages[:2]] == ["psft", "grpo"]
    assert (res.accelerator, res.gpus) == ("nvidia.com/gpu", 8) and res.tolerations and res.node_selector


def test_unknown_key(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"][1].update(setings={"k": [1]}))
    assert "stages[1].setings: unknown key; allowed: name, resources, settings, stage, start_from" in msg
    msg = spec_error(tmp_path, lambda d: d.update(resources={"gpu": 8}))
    assert "resources.gpu: unknown key; allowed: accelerator, cpu, gpus" in msg


def test_unknown_stage_setting_is_checked_by_the_stage_config(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"].update(lerning_rate=0.1))
    assert "stages[0].settings.lerning_rate: unknown key; allowed:" in msg and "train" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"].update(warmup_steps=5))  # the old flat form
    assert "stages[0].settings.warmup_steps: unknown key here; it is a key of `train`: write train: {warmup_steps: 5}" \
        in msg


def test_wrong_type(tmp_path):
    msg = spec_error(tmp_path, lambda d: d.update(resources={"accelerator": "nvidia.com/gpu", "gpus": "eight"}))
    assert "resources.gpus: 'eight' is invalid: an integer" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"]["train"].update(max_steps=2.5))
    assert "stages[0].settings.train.max_steps: 2.5 is invalid: a positive integer" in msg


def test_negative_learning_rate(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"]["train"].update(lr=-0.001))
    assert "stages[0].settings.train.lr: -0.001 is invalid: a positive number" in msg


def test_dpo_without_preference_data(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"].insert(1, {"stage": "dpo"}))
    assert "stages[1].stage: 'dpo' is invalid here: it needs preference data" in msg
    assert "source of shape 'preference'" in msg and "reward_scoring stage before it" in msg


def test_dpo_with_a_preference_source_is_valid():
    data = copy.deepcopy(BASE)
    data["data"]["sources"].append({"uri": "s3://posttrain-data/prefs.jsonl", "shape": "preference"})
    data["stages"].insert(1, {"stage": "dpo", "settings": {"beta": 0.2}})
    assert [s.stage for s in parse_spec(data).stages][:2] == ["psft", "dpo"]


def test_grpo_without_rewards(tmp_path):
    def change(d):
        d["data"]["sources"].append({"task": "arithmetic", "rows": 50, "shape": "prompts", "seed": 1})
        d["stages"].insert(1, {"stage": "grpo"})
    msg = spec_error(tmp_path, change)
    assert "stages[1].stage: 'grpo' is invalid: it scores completions, and `rewards` is empty" in msg


def _with_prompts_and(*stages):
    def change(d):
        d["data"]["sources"].append({"task": "arithmetic", "rows": 50, "shape": "prompts", "seed": 1})
        d["stages"][1:1] = list(stages)
    return change


def test_ppo_without_any_reward(tmp_path):
    msg = spec_error(tmp_path, _with_prompts_and({"stage": "ppo"}))
    assert "stages[1].settings.rewards: [] is invalid: a non-empty list: ppo needs a reward to maximize; give the " \
           "spec's `rewards` or the stage's own" in msg


def test_ppo_rewards_of_its_own_or_the_specs():
    data = copy.deepcopy(BASE)
    _with_prompts_and({"stage": "ppo", "settings": {"rewards": [{"name": "arithmetic"}]}})(data)
    assert [s.stage for s in parse_spec(data).stages][:2] == ["psft", "ppo"]
    data = copy.deepcopy(BASE)
    _with_prompts_and({"stage": "ppo"})(data)
    data["rewards"] = [{"name": "arithmetic"}]
    assert parse_spec(data).stages[1].stage == "ppo"


def test_a_reward_naming_a_stages_model(tmp_path):
    rm = {"stage": "ppo", "settings": {"rewards": [{"name": "reward_model", "uri": "stage:reward_model"}]}}
    msg = spec_error(tmp_path, _with_prompts_and(rm))  # no reward_model stage before ppo
    assert "stages[1].settings.rewards[0].uri: 'stage:reward_model' is invalid for the ppo stage: no reward_model " \
           "stage before it (stages before: psft)" in msg

    def top_level(d):  # evaluate gets the spec's rewards, and has no input for a reward model
        _with_prompts_and({"stage": "reward_scoring"}, {"stage": "reward_model"})(d)
        d["rewards"] = [{"name": "arithmetic"}, {"name": "reward_model", "uri": "stage:reward_model"}]
    msg = spec_error(tmp_path, top_level)
    assert "rewards[1].uri: 'stage:reward_model' is invalid for the reward_scoring stage: no reward_model stage " \
           "before it" in msg


def test_register_without_evaluate(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"].pop(1))
    assert "stages[1].stage: 'register' is invalid here: it needs the latest evaluation results from a stage " \
           "before it (evaluate)" in msg


def test_stage_that_needs_missing_data(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["data"]["sources"][0].update(shape="prompts"))
    assert "stages[0].stage: 'psft' is invalid here: it trains on data of shape 'sft'" in msg
    assert "training shapes: prompts" in msg


def test_a_source_of_eval_rows_only_does_not_feed_training(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["data"]["sources"][0].update(role="eval"))
    assert "'psft' is invalid here: it trains on data of shape 'sft'" in msg and "training shapes: none" in msg

    def ood_prompts(d):  # a task source of split ood is eval-only by default: grpo has nothing to train on
        d["data"]["sources"].append({"task": "arithmetic", "rows": 50, "shape": "prompts", "split": "ood"})
        d["rewards"] = [{"name": "arithmetic"}]
        d["stages"].insert(1, {"stage": "grpo"})
    msg = spec_error(tmp_path, ood_prompts)
    assert "stages[1].stage: 'grpo' is invalid here: it trains on data of shape 'prompts'" in msg


def test_gpu_count_without_accelerator_type(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"][0].update(resources={"gpus": 8}))
    assert "stages[0].resources.gpus: 8 is invalid: 0 unless `accelerator` names the accelerator type" in msg


def test_promotion_metric_the_eval_does_not_produce(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["promotion"].update(metric="arithmetic-test/accuracy"))
    assert "promotion.metric: 'arithmetic-test/accuracy' is invalid: the eval will not produce it" in msg
    assert "arithmetic-id, arithmetic-ood" in msg and "arithmetic-id/accuracy" in msg
    msg = spec_error(tmp_path, lambda d: d["promotion"]["guards"][0].update(metric="arithmetic-ood/pass@4"))
    assert "promotion.guards[0].metric: 'arithmetic-ood/pass@4' is invalid" in msg


def test_pass_at_k_is_known_when_the_evaluate_stage_reports_it():
    data = copy.deepcopy(BASE)
    data["stages"][1]["settings"] = {"samples": 4, "k": [1, 4], "temperature": 0.7}
    data["promotion"]["metric"] = "arithmetic-id/pass@4"
    assert parse_spec(data).promotion.metric == "arithmetic-id/pass@4"


def test_key_the_pipeline_sets(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"].update(train_data="x.jsonl"))
    assert "stages[0].settings.train_data: 'x.jsonl' is invalid here: set by the pipeline" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"].update(objective={"method": "sft"}))
    assert "stages[0].settings.objective.method: 'sft' is invalid here: set by the stage kind" in msg


def test_bad_values_inside_nested_parts(tmp_path):
    tol = {"accelerator": "nvidia.com/gpu", "gpus": 1, "tolerations": [{"key": "gpu", "operator": "Maybe"}]}
    msg = spec_error(tmp_path, lambda d: d.update(resources=tol))
    assert "resources.tolerations[0].operator: 'Maybe' is invalid: Equal or Exists" in msg
    msg = spec_error(tmp_path, lambda d: d.update(schedule={"cron": "0 3 * * 1"}))
    assert "schedule.cron: '0 3 * * 1' is invalid: a cron expression of 6 fields" in msg
    msg = spec_error(tmp_path, lambda d: d.update(name="My_Spec"))
    assert "name: 'My_Spec' is invalid: lowercase letters, digits and '-'" in msg
    msg = spec_error(tmp_path, lambda d: d.update(base_model="hf://Qwen/Qwen2.5-1.5B"))
    assert "base_model: 'hf://Qwen/Qwen2.5-1.5B' is invalid: s3://bucket/key, a local path" in msg
    msg = spec_error(tmp_path, lambda d: d["data"]["sources"][0].update(task="chess"))
    assert "data: " in msg and "chess" in msg and "arithmetic" in msg  # data_prep's config lists known tasks


def test_missing_required_key(tmp_path):
    msg = spec_error(tmp_path, lambda d: d.pop("base_model"))
    assert "base_model: missing; this key is required" in msg


def test_unknown_spec_name_lists_the_bundled_ones():
    with pytest.raises(SpecError, match=r"nosuch: no such file, .*\(bundled: demo, sft-psft, compare, rlhf-demo, "
                                        r"cluster, cluster-7b, cluster-70b-lora\)"):
        load_spec("nosuch")


@pytest.mark.parametrize("item, message", [
    ("psft_lr=-1", "--param psft_lr='-1' is invalid: a positive number"),
    ("psft_lr=inf", "--param psft_lr='inf' is invalid: a positive number"),
    ("psft_max_steps=0", "--param psft_max_steps='0' is invalid: a positive integer"),
])
def test_pipeline_parameters_out_of_range(item, message):
    from pipelines.posttrain import parse_params

    with pytest.raises(ValueError) as e:
        parse_params(parse_spec(copy.deepcopy(BASE)), [item])
    assert str(e.value) == message


def test_guard_direction_reaches_the_promotion_rule(tmp_path):
    from components.promotion import PromotionRule, decide

    data = copy.deepcopy(BASE)
    data["promotion"]["guards"].append({"metric": "arithmetic-ood/kl_to_base", "max_drop": 0.01, "direction": "min"})
    rule = PromotionRule.from_mapping(dataclasses.asdict(parse_spec(data).promotion))
    champion = {"arithmetic-id/accuracy": 0.5, "arithmetic-ood/accuracy": 0.1, "arithmetic-ood/kl_to_base": 0.30}
    better_kl = {"arithmetic-id/accuracy": 0.6, "arithmetic-ood/accuracy": 0.1, "arithmetic-ood/kl_to_base": 0.05}
    assert decide(rule, better_kl, champion).promote  # a lower KL is no drop for a `min` guard
    worse_kl = {**better_kl, "arithmetic-ood/kl_to_base": 0.40}
    assert not decide(rule, worse_kl, champion).promote
    msg = spec_error(tmp_path, lambda d: d["promotion"]["guards"][0].update(direction="up"))
    assert "promotion.guards[0].direction: 'up' is invalid: max or min" in msg


def test_a_sampling_stage_takes_one_node_of_the_pool(tmp_path):
    data = copy.deepcopy(BASE)
    data["resources"] = {"accelerator": "nvidia.com/gpu", "gpus": 8, "nodes": 2, "max_nodes": 4}
    data["storage"] = {"workspace_access_modes": ["ReadWriteMany"]}
    spec = parse_spec(data)
    psft, evaluate = spec.stages[0], spec.stages[1]
    assert spec.stage_resources(psft).gpus == 8 and spec.stage_resources(psft).most_nodes == 4  # the training pool
    sampling = spec.stage_resources(evaluate)  # one node of it: one process per accelerator, a shard each
    assert sampling.gpus == 8 and sampling.accelerator == "nvidia.com/gpu" and not sampling.multi_node

    msg = spec_error(tmp_path, lambda d: d["stages"][1].update(resources={"accelerator": "nvidia.com/gpu", "gpus": 2,
                                                                          "max_nodes": 2}))
    assert "stages[1].resources.max_nodes: 2 is invalid for the evaluate stage: only a stage that declares " \
           "multi_node runs on several nodes (sft, psft, sft_kl, dpo, reward_model, grpo, ppo); 1" in msg


def test_tensor_parallelism_must_divide_the_stages_gpus(tmp_path):
    def tp(size, gpus=None, engine="vllm"):
        def change(d):
            d["stages"][1]["settings"] = {"rollout": {"engine": engine, "tensor_parallel_size": size}}
            if gpus is not None:
                d["stages"][1]["resources"] = {"accelerator": "nvidia.com/gpu", "gpus": gpus}
        return change

    ok = copy.deepcopy(BASE)
    tp(4, gpus=8)(ok)
    parse_spec(ok)
    msg = spec_error(tmp_path, tp(3, gpus=8))
    assert "stages[1].settings.rollout.tensor_parallel_size: 3 is invalid: a divisor of the stage's accelerators " \
           "(stages[1].resources.gpus: 8)" in msg
    msg = spec_error(tmp_path, tp(2))  # no accelerators: one process
    assert "stages[1].settings.rollout.tensor_parallel_size: 2 is invalid: a divisor of the stage's accelerators " \
           "(resources.gpus: 0)" in msg
    msg = spec_error(tmp_path, tp(2, gpus=2, engine="hf"))
    assert "tensor_parallel_size" in msg and "needs engine: vllm" in msg


def test_infinite_learning_rate(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["stages"][0]["settings"]["train"].update(lr=float("inf")))
    assert "stages[0].settings.train.lr: inf is invalid: a positive number" in msg


@pytest.mark.parametrize("uri", ["s3://bucket/../x", "s3://bucket/a/./b", "s3://bucket/a//b", "s3://bucket/a\\b"])
def test_s3_keys_that_could_escape_are_refused_at_check_time(tmp_path, uri):
    from components.storage import localize, split_s3

    with pytest.raises(ValueError, match="the key .* has an empty, '.' or '..' segment or a backslash"):
        split_s3(uri)
    with pytest.raises(ValueError, match="segment"):  # before any client or cache path exists
        localize(uri, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    msg = spec_error(tmp_path, lambda d: d.update(base_model=uri))
    assert f"base_model: {uri!r} is invalid: s3://bucket/key with plain key segments" in msg
    msg = spec_error(tmp_path, lambda d: d["data"]["sources"].append({"uri": uri, "shape": "sft"}))
    assert "data: " in msg and "segment" in msg, msg
    assert split_s3("s3://bucket/a/b..c/") == ("bucket", "a/b..c")


def test_a_training_kind_may_repeat_under_its_own_name_and_start_from_an_earlier_model(tmp_path):
    data = copy.deepcopy(BASE)
    data["stages"][1:1] = [{"stage": "sft", "name": "sft_longer", "start_from": "psft"},
                           {"stage": "psft", "name": "psft_again", "start_from": "psft"}]
    spec = parse_spec(data)
    assert [(s.name, s.stage, s.start_from) for s in spec.stages[:3]] == [
        ("psft", "psft", None), ("sft_longer", "sft", "psft"), ("psft_again", "psft", "psft")]
    from pipelines.posttrain import lineage, pipeline_parameters
    assert lineage(spec.stages) == {"psft": "base", "sft_longer": "psft", "psft_again": "psft"}
    assert {"psft_again_lr", "psft_again_max_steps", "sft_longer_lr"} <= {p[0] for p in pipeline_parameters(spec)}

    msg = spec_error(tmp_path, lambda d: d["stages"].insert(1, {"stage": "psft"}))
    assert "stages[1].name: 'psft' is invalid: each stage needs its own name (already stages[0]; set `name`)" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"].insert(2, {"stage": "evaluate", "name": "again"}))
    assert "stages[2].stage: 'evaluate' is invalid: a kind of stage that makes no model appears once" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"].insert(1, {"stage": "sft", "name": "b", "start_from": "nope"}))
    assert "stages[1].start_from: 'nope' is invalid: base (the base model) or the name of an earlier stage that " \
           "made a model (psft)" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"][0].update(name="Bad-Name"))
    assert "stages[0].name" in msg and "lowercase letters, digits and '_'" in msg


def test_the_compare_spec_branches_from_one_sft_start():
    from pipelines.posttrain import lineage
    spec = load_spec("compare")
    assert lineage(spec.stages) == {"sft": "base", "sft_longer": "sft", "psft": "sft", "sft_grpo": "sft",
                                    "sft_dpo": "sft", "sft_grpo_half": "sft", "sft_grpo_dpo": "sft_grpo_half"}
    # the same budget of trained sequences for each arm (steps × batch size; a DPO pair is two sequences)
    def sequences(name):
        st = next(s for s in spec.stages if s.name == name)
        per_step = st.settings["train"]["batch_size"] * (2 if st.stage == "dpo" else 1)
        return st.settings["train"]["max_steps"] * per_step
    arms = [["sft_longer"], ["psft"], ["sft_grpo"], ["sft_dpo"], ["sft_grpo_half", "sft_grpo_dpo"]]
    assert {sum(sequences(n) for n in arm) for arm in arms} == {25_600}


def test_a_stage_may_start_from_the_base_model(tmp_path):
    from pipelines.posttrain import lineage

    data = copy.deepcopy(BASE)
    data["stages"][1:1] = [{"stage": "sft", "start_from": "base"}]
    spec = parse_spec(data)
    assert lineage(spec.stages) == {"psft": "base", "sft": "base"}  # not psft's model, the latest one
    msg = spec_error(tmp_path, lambda d: d["stages"].insert(1, {"stage": "sft", "name": "base"}))
    assert "stages[1].name: 'base' is invalid: it names the base model (set `name`)" in msg
    msg = spec_error(tmp_path, lambda d: d["stages"][2].update(start_from="base"))  # register
    assert "stages[2].start_from: 'base' is invalid for the register stage: it needs the model of the training " \
           "stage before (there must be one)" in msg


def test_eval_suites_are_checked_by_the_evaluating_stages_config_and_named_as_eval_suites(tmp_path):
    msg = spec_error(tmp_path, lambda d: d["eval_suites"].append({"task": "algebra"}))
    assert "spec.yaml: eval_suites[2].task='algebra' is invalid: one of " in msg and "\n" not in msg, msg
    msg = spec_error(tmp_path, lambda d: d["eval_suites"].append({"task": "arithmetic", "split": "id"}))
    assert "eval_suites=" in msg and "suites with distinct names" in msg
    # the promotion rule is checked against the metrics that config will write (its k, from the stage's settings)
    msg = spec_error(tmp_path, lambda d: d["promotion"].update(metric="arithmetic-id/pass@4"))
    assert "promotion.metric: 'arithmetic-id/pass@4' is invalid: the eval will not produce it" in msg
    data = copy.deepcopy(BASE)
    data["stages"][1]["settings"] = {"samples": 4, "k": [1, 4], "temperature": 0.7}
    data["promotion"]["metric"] = "arithmetic-id/pass@4"
    assert parse_spec(data).promotion.metric == "arithmetic-id/pass@4"


def test_the_data_sources_parameter_is_checked_by_the_data_steps_config():
    from pipelines.posttrain import parse_params

    spec = parse_spec(copy.deepcopy(BASE))
    good = '[{"task": "arithmetic", "rows": 10, "shape": "sft"}]'
    assert parse_params(spec, [f"data_sources={good}"]) == {"data_sources": good}
    with pytest.raises(ValueError) as e:
        parse_params(spec, ['data_sources=[{"task": "arithmetic", "rows": 10, "shape": "dpo"}]'])
    assert str(e.value).startswith("--param data_sources: sources[0]") and "shape" in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"--param data_sources: sources: the name .* is used 2 times"):
        parse_params(spec, [f"data_sources=[{good[1:-1]}, {good[1:-1]}]"])
