"""`posttrain bench --size demo`: the demo's PSFT step (pipelines/specs/demo.yaml) as a bench size."""

from pathlib import Path

import yaml

from components.models import TINY_CONFIG, build_char_tokenizer, tiny_config
from pipelines.bench import cli
from pipelines.bench.workloads import DEMO_FLAGS, SIZES, build_model, demo_examples, qwen2_config, size_params


def test_the_demo_size_is_the_demo_models_config():
    """Every field (rope_theta, max_position_embeddings, ... not only the shape) is the demo model's."""
    demo = tiny_config(len(build_char_tokenizer())).to_dict()
    assert qwen2_config("demo").to_dict() == demo
    assert demo["max_position_embeddings"] == 256 and demo["rope_parameters"]["rope_theta"] == 10000.0
    spec = yaml.safe_load(Path(TINY_CONFIG).read_text())
    shape = {k: spec[k] for k in SIZES["tiny"] if k != "vocab_size"}
    assert SIZES["demo"] == {**shape, "vocab_size": demo["vocab_size"]}
    assert size_params("demo") == sum(p.numel() for p in build_model("demo").parameters())


def test_the_demo_size_takes_the_demos_psft_step_unless_a_flag_says_otherwise():
    demo = yaml.safe_load((Path(__file__).parents[2] / "pipelines/specs/demo.yaml").read_text())
    psft = next(s["settings"] for s in demo["stages"] if s["stage"] == "psft")
    assert DEMO_FLAGS == {"--batch-size": str(psft["train"]["batch_size"]),
                          "--token-budget": str(psft["train"]["token_budget"]),
                          "--updates-per-batch": str(psft["objective"]["updates_per_batch"])}
    a = cli._parser().parse_args(cli.with_size_defaults(["--size", "demo", "--batch-size=64"]))
    assert (a.batch_size, a.token_budget, a.updates_per_batch) == (64, 512, 4)
    a = cli._parser().parse_args(cli.with_size_defaults(["--size", "tiny"]))
    assert (a.batch_size, a.token_budget, a.updates_per_batch) == (8, None, 8)


def test_the_demo_rows_are_arithmetic_problems_of_about_1_5k_tokens_a_step():
    examples = demo_examples(128)
    tokens = sum(len(e) for e in examples)
    assert 1200 <= tokens <= 1800
    assert all(0 < e.completion_start < len(e) for e in examples)


def test_the_demo_size_has_no_peer(capsys):
    assert cli.main(["--size", "demo", "--objectives", "psft", "--peers", "trl"]) == 2
    assert "--size demo has no peer" in capsys.readouterr().err
