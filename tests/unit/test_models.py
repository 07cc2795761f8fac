"""The tiny model is built locally, and loading refuses anything but safetensors."""

import shutil

import pytest
import torch

from components.models import check_model_dir, load_model, load_tokenizer, resolve_attention


def test_tiny_model_builds_and_loads(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 4
    assert model.config.vocab_size == len(tok)
    assert list(tiny_model_dir.glob("*.safetensors"))
    assert tok.decode(tok("7+8=15", add_special_tokens=False)["input_ids"]) == "7+8=15"


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(found model\.bin"):
        check_model_dir(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_dir(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU auto may pick flash-attention")
def test_attention_auto_is_sdpa_without_gpu():
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("eager") == "eager"


def test_saved_tokenizer_loads_as_saved(tiny_model_dir):
    """The tiny tokenizer (a qwen2 model's directory, a tokenizers-library tokenizer) round-trips spaces and
    newlines: AutoTokenizer alone would rebuild it as Qwen2Tokenizer, which drops both."""
    tok = load_tokenizer(tiny_model_dir)
    text = "Cards: 3, 4, J, Q.\nMake 24 with (3 + 4) * 2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|end|>" and tok.chat_template
