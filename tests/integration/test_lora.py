"""LoRA through peft on the tiny model: SFT with adapters learns, the counts are peft's, the merged output is a
plain model that evaluate reads, the adapter output is that same model, DPO's and GRPO's reference is the base
(adapter disabled, no second model loaded), and QLoRA off a GPU is a one-line error."""

import json
from pathlib import Path

import pytest
import torch

import components.models
from components.config import ConfigError, from_mapping
from components.datasets import write_jsonl
from components.dpo import main as dpo
from components.dpo.config import DPOConfig
from components.evaluate.config import EvaluateConfig
from components.evaluate.main import run as run_evaluate
from components.grpo.config import GRPOConfig
from components.grpo.main import run as run_grpo
from components.models import load_model
from components.sft.config import SFTConfig
from components.sft.main import main as sft_main
from components.sft.main import run as run_sft
from components.tasks import get_task
from components.training.batching import encode_example
from components.training.config import Adapter
from components.training.lora import QuantizationUnavailable

LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rows = get_task("arithmetic").generate(64, seed=1, split="id", part="train")
    path = tmp_path_factory.mktemp("lora-data") / "train.jsonl"
    write_jsonl(path, [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    return path


def sft_settings(model, data, out, **lora):
    return {"model": str(model), "train_data": str(data), "output_dir": str(out), "max_length": 96,
            "lora": {**LORA, **lora},
            "train": {"max_steps": 10, "batch_size": 8, "token_budget": 512, "lr": 1e-2, "log_every": 50}}


@pytest.fixture(scope="module")
def lora_sft(tiny_model_dir, sft_data, tmp_path_factory):
    """The SFT stage with LoRA twice, the same run: once saving the merged model, once the adapter."""
    tmp = tmp_path_factory.mktemp("lora-sft")
    runs = {}
    for output in ("merged", "adapter"):
        cfg = from_mapping(SFTConfig, sft_settings(tiny_model_dir, sft_data, tmp / output, output=output))
        runs[output] = (cfg, run_sft(cfg))
    return runs


def test_sft_with_lora_lowers_the_loss(lora_sft):
    cfg, summary = lora_sft["merged"]
    losses = [record["loss"] for record in lines(Path(cfg.output_dir) / "metrics.jsonl")]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_the_trainable_parameter_count_is_peft_s(lora_sft, tiny_model_dir, caplog):
    from peft import get_peft_model

    _, summary = lora_sft["merged"]
    expected = get_peft_model(load_model(tiny_model_dir), Adapter(**LORA).peft_config()).get_nb_trainable_parameters()
    assert (summary["trainable_params"], summary["total_params"]) == expected
    full = sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    # r=8 on every linear layer but the head: far fewer than the model's weights, which all still count
    assert 0 < summary["trainable_params"] < full / 5 and summary["total_params"] == full + summary["trainable_params"]
    assert summary["output"] == "merged" and lora_sft["adapter"][1]["output"] == "adapter"
    saved = json.loads((Path(lora_sft["merged"][0].output_dir) / "summary.json").read_text())
    assert {key: saved[key] for key in ("output", "trainable_params", "total_params")} == \
        {key: summary[key] for key in ("output", "trainable_params", "total_params")}


def test_merged_output_is_a_plain_model_equal_to_base_plus_adapter(lora_sft, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = Path(lora_sft["merged"][0].output_dir) / "model"
    adapter_dir = Path(lora_sft["adapter"][0].output_dir) / "model"
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    assert (adapter_dir / "tokenizer.json").exists() and not (adapter_dir / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(load_model(tiny_model_dir), adapter_dir).eval()
    base = load_model(tiny_model_dir).eval()
    ids = torch.tensor([list(range(7, 40))])
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
        assert torch.allclose(logits, adapted(input_ids=ids).logits, atol=1e-4)
        assert (logits - base(input_ids=ids).logits).abs().max() > 1e-2  # training changed the model
    with pytest.raises(components.models.ModelDirError, match="LoRA adapter directory"):
        components.models.check_model_dir(adapter_dir)


def test_a_bf16_stage_loads_the_frozen_base_in_bf16_and_writes_a_bf16_merged_model(tiny_model_dir, sft_data,
                                                                                    tmp_path):
    """bf16 compute (precision bf16-mixed; auto on a GPU): the frozen base in bf16, the adapters in fp32, and the
    merged model written in bf16; fp32 compute keeps everything fp32."""
    from components.models.config import ModelLoading
    from components.training.config import TrainConfig
    from components.training.lora import load_policy

    for precision, base_dtype in (("bf16-mixed", torch.bfloat16), ("fp32", torch.float32)):
        policy = load_policy(tiny_model_dir, ModelLoading(), Adapter(**LORA), 0, TrainConfig(precision=precision))
        assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {base_dtype}
        assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}
    settings = sft_settings(tiny_model_dir, sft_data, tmp_path / "bf16")
    settings["train"] = {**settings["train"], "max_steps": 2, "precision": "bf16-mixed"}
    run_sft(from_mapping(SFTConfig, settings))
    merged = tmp_path / "bf16" / "model" / "model.safetensors"
    with open(merged, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert load_model(merged.parent).model.embed_tokens.weight.dtype == torch.float32  # loads as any model


def test_evaluate_reads_the_merged_output(lora_sft, tiny_model_dir, tmp_path):
    merged_dir = Path(lora_sft["merged"][0].output_dir) / "model"
    cfg = from_mapping(EvaluateConfig, {
        "model": str(merged_dir), "name": "lora", "output_dir": str(tmp_path / "eval"),
        "baselines": {"base": str(tiny_model_dir)}, "base_model": str(tiny_model_dir),
        "suites": [{"task": "arithmetic", "split": "id", "n_prompts": 6, "seed": 5}],
        "samples": 2, "temperature": 1.0, "max_new_tokens": 4, "k": [1], "bootstrap_samples": 50})
    run_evaluate(cfg)
    doc = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert "arithmetic-id/accuracy" in doc["metrics"], sorted(doc["metrics"])


def test_qlora_off_a_gpu_is_a_one_line_error(tiny_model_dir, sft_data, tmp_path, capsys):
    settings = sft_settings(tiny_model_dir, sft_data, tmp_path / "out", quantize="4bit")
    with pytest.raises(QuantizationUnavailable, match=r"^lora.quantize='4bit': QLoRA needs a CUDA device") as e:
        run_sft(from_mapping(SFTConfig, settings))
    assert "\n" not in str(e.value)
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as exit_:
        sft_main(["--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora.quantize='4bit'" in err


def test_lora_settings_are_checked(tiny_model_dir, sft_data, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.quantize: '4bit' is invalid: none unless enabled is true"):
        from_mapping(SFTConfig, {**sft_settings(tiny_model_dir, sft_data, tmp_path), "lora": {"quantize": "4bit"}})
    with pytest.raises(ConfigError, match=r"lora\.output: 'both' is invalid: one of merged, adapter"):
        from_mapping(SFTConfig, sft_settings(tiny_model_dir, sft_data, tmp_path, output="both"))
    with pytest.raises(ConfigError, match=r"lora\.r: 0 is invalid"):
        from_mapping(SFTConfig, sft_settings(tiny_model_dir, sft_data, tmp_path, r=0))
    with pytest.raises(ConfigError, match=r"it is a key of `lora`"):
        from_mapping(SFTConfig, {**sft_settings(tiny_model_dir, sft_data, tmp_path), "target_modules": ["q_proj"]})
    assert from_mapping(SFTConfig, sft_settings(tiny_model_dir, sft_data, tmp_path, target_modules=["q_proj"]))


@pytest.fixture
def count_loads(monkeypatch):
    """How many models the stage loads (ModelLoading.load_model goes through components.models.load_model)."""
    loads = []
    real = components.models.load_model

    def counted(path, **kw):
        loads.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(components.models, "load_model", counted)
    return loads


@pytest.mark.parametrize("method", ["psft", "sft_kl"])
def test_sft_methods_with_lora(method, tiny_model_dir, sft_data, tmp_path, count_loads):
    settings = sft_settings(tiny_model_dir, sft_data, tmp_path, output="adapter")
    settings["objective"] = {"method": method, "updates_per_batch": 2}
    settings["train"]["max_steps"] = 4
    summary = run_sft(from_mapping(SFTConfig, settings))
    history = lines(tmp_path / "metrics.jsonl")
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    if method == "sft_kl":  # the reference is the base (adapter disabled): equal to the policy at step 1
        assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and history[-1]["kl"] > 1e-4
    assert count_loads == [str(tiny_model_dir)] and summary["output"] == "adapter"


def pair_rows():
    return [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(6) for b in range(4)]


def base_sequence_logprobs(model_dir, tokenizer, rows):
    """Σ of completion-token log-probs of every chosen and rejected completion under the base model, one
    unpacked forward per sequence: computed apart from the stage's packed reference pass."""
    model = load_model(model_dir).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            for side in ("chosen", "rejected"):
                example = encode_example(tokenizer, row["prompt"], row[side], source="test")
                ids = torch.tensor([example.input_ids])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
                targets = ids[0, 1:]
                token = logprobs.gather(-1, targets[:, None])[:, 0]
                out.append(float(token[example.completion_start - 1:].sum()))
    return torch.tensor(out, dtype=torch.float64)


def base_pass(model_dir, tokenizer, rows, out):
    """The stage's reference pass code (dpo._pair_logprobs) over the base model, loaded on its own."""
    from components.training.config import TrainConfig
    from components.training.loop import Session

    pairs, _ = dpo.encode_pairs(rows, tokenizer, 1024, "pairs")
    model = load_model(model_dir)
    session = Session(TrainConfig(token_budget=64), model, out)
    model.eval()
    with torch.no_grad():
        return dpo._pair_logprobs(session, model, [example for pair in pairs for example in pair],
                                  tokenizer.pad_token_id, False)


def test_dpo_with_lora_references_the_base_with_the_adapter_disabled(tiny_model_dir, tmp_path, monkeypatch,
                                                                      count_loads):
    """A DPO run resumed from a checkpoint (its adapter trained): its reference pass gives the base model's
    log-probs, without loading a second model, while the policy's own log-probs have moved away from them."""
    write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    passes = []
    real_reference = dpo.reference_logprobs

    def captured(cfg, session, model, examples, pad_id):
        reference = real_reference(cfg, session, model, examples, pad_id)
        with torch.no_grad():
            model.eval()
            policy = dpo._pair_logprobs(session, model, examples, pad_id, False)
            model.train()
        passes.append((session.start_step, reference, policy))
        return reference

    monkeypatch.setattr(dpo, "reference_logprobs", captured)
    settings = {"model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"),
                "output_dir": str(tmp_path / "dpo"), "beta": 0.5, "lora": {**LORA, "output": "adapter"},
                "train": {"max_steps": 3, "batch_size": 8, "token_budget": 64, "lr": 2e-2, "checkpoint_every": 2}}
    dpo.run(from_mapping(DPOConfig, settings))
    (tmp_path / "dpo" / "model").rename(tmp_path / "first-model")
    # again into the same output_dir, with more steps: it resumes from step 2's checkpoint
    settings["train"].update(max_steps=5, allow_config_change=True)
    summary = dpo.run(from_mapping(DPOConfig, settings))
    assert [start for start, _, _ in passes] == [0, 2]
    assert count_loads == [str(tiny_model_dir)] * 2  # one policy per run, no reference model

    tokenizer = components.models.load_tokenizer(tiny_model_dir)
    # the base model loaded on its own: through the stage's pass (packed, chunked head) and unpacked, one
    # sequence per forward (fp32 sums in another order: equal to rounding)
    base = base_pass(tiny_model_dir, tokenizer, pair_rows(), tmp_path / "base")
    unpacked = base_sequence_logprobs(tiny_model_dir, tokenizer, pair_rows())
    assert (base - unpacked).abs().max() <= 1e-5
    for start, reference, _ in passes:
        assert (reference - base).abs().max() <= 1e-6, (start, (reference - base).abs().max())
    fresh, resumed = passes[0][1], passes[1][1]
    assert torch.equal(fresh, resumed) or (fresh - resumed).abs().max() < 1e-6
    assert (passes[1][2] - base).abs().max() > 1e-2  # the resumed policy's adapter is trained: not the base
    assert summary["output"] == "adapter" and summary["trainable_params"] > 0


def test_dpo_reference_equals_the_base_model_pass(tiny_model_dir, tmp_path):
    """The same reference pass (packing, chunked head) over the base model loaded on its own and over a LoRA
    policy whose adapter is far from zero: equal to 1e-6."""
    from components.training.loop import Session
    from components.training.lora import load_policy

    write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = from_mapping(DPOConfig, {"model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"),
                                   "output_dir": str(tmp_path / "out"), "lora": LORA,
                                   "train": {"token_budget": 64}})
    tokenizer = components.models.load_tokenizer(tiny_model_dir)
    pairs, _ = dpo.encode_pairs(pair_rows(), tokenizer, cfg.max_length, "pairs")
    examples = [example for pair in pairs for example in pair]
    policy = load_policy(cfg.model, cfg.loading, cfg.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    session = Session(cfg.train, policy, tmp_path / "policy")
    reference = dpo.reference_logprobs(cfg, session, policy, examples, tokenizer.pad_token_id)
    base_model = load_model(tiny_model_dir)
    base_session = Session(cfg.train, base_model, tmp_path / "base")
    base_model.eval()
    with torch.no_grad():
        base = dpo._pair_logprobs(base_session, base_model, examples, tokenizer.pad_token_id, False)
        policy.eval()
        adapted = dpo._pair_logprobs(session, policy, examples, tokenizer.pad_token_id, False)
    assert (reference - base).abs().max() <= 1e-6
    assert (adapted - base).abs().max() > 0.1  # the adapter is active outside the reference pass


def test_grpo_with_lora_and_kl_loads_one_model(tiny_model_dir, tmp_path, count_loads):
    cfg = from_mapping(GRPOConfig, {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "g"),
                                    "prompts": {"task": "arithmetic", "task_rows": 16}, "prompts_per_round": 2,
                                    "num_generations": 4, "beta": 0.1, "lora": {**LORA, "output": "adapter"},
                                    "sampling": {"max_new_tokens": 6},
                                    "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2}})
    summary = run_grpo(cfg)
    history = lines(tmp_path / "g" / "metrics.jsonl")
    assert len(history) == 2 and history[0]["kl"] == pytest.approx(0, abs=1e-6)  # reference == starting policy
    assert count_loads == [str(tiny_model_dir)] and summary["output"] == "adapter"
    assert (tmp_path / "g" / "model" / "adapter_model.safetensors").exists()
