"""Models and tokenizers: the tiny demo model built from a config in the repo, and safe loading.

A model is always a Hugging Face directory (config.json, *.safetensors, tokenizer files), so every stage
can start from a user's base model or from any other stage's output. Weights load from safetensors only:
nothing from a user path goes through pickle, and `trust_remote_code` stays off.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from components.config import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TINY_CONFIG = Path(__file__).with_name("tiny.yaml")

# Special tokens of the character-level tokenizer. `<|end|>` closes every chat turn and is the EOS token,
# so generation stops when the assistant's message ends.
PAD, EOS, BOS = "<|pad|>", "<|end|>", "<|bos|>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer():
    """A character-level tokenizer over printable ASCII and newline, with chat special tokens.

    Every task family writes prompts and completions in printable ASCII, so this alphabet covers them all;
    an unknown character maps to `<|unk|>` rather than failing.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, BOS, "<|unk|>"] + [f"<|{r}|>" for r in ROLES]
    chars = list("\n" + "".join(chr(c) for c in range(32, 127)))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token="<|unk|>",
        additional_special_tokens=[f"<|{r}|>" for r in ROLES],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; training packs and never pads inside a sequence
    return fast


def tiny_config(vocab_size: int, config_path: Path = TINY_CONFIG):
    from transformers import LlamaConfig, Qwen2Config

    spec = yaml.safe_load(config_path.read_text())
    arch = spec.pop("architecture")
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(arch)
    if cls is None:
        raise ValueError(f"{config_path}: architecture {arch!r} is not one of qwen2, llama")
    return cls(vocab_size=vocab_size, use_cache=True, **spec)


def build_tiny_model(out_dir: str | Path, seed: int = 0, config_path: Path = TINY_CONFIG) -> Path:
    """Build the random-init tiny model and its tokenizer and save both (safetensors) to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tok = build_char_tokenizer()
    cfg = tiny_config(len(tok), config_path)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny model (%s, %.2fM parameters) in %s", cfg.model_type, n / 1e6, out)
    return out


class ModelDirError(UserError, FileNotFoundError):
    """A path given as a model directory is not one (missing, no config, no safetensors, no tokenizer)."""


def check_model_dir(path: str | Path) -> Path:
    """A model directory must hold config.json and safetensors weights; pickle weights are refused."""
    p = Path(path)
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise ModelDirError(f"{p}: a LoRA adapter directory (adapter_config.json), not a model: load it on its "
                                "base model, or train with lora.output: merged")
        raise ModelDirError(f"{p}: not a model directory (no config.json)")
    if not any(p.glob("*.safetensors")):
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        extra = f" (found {', '.join(pickled)}; convert them to safetensors)" if pickled else ""
        raise ModelDirError(f"{p}: no *.safetensors weights{extra}; only safetensors are loaded")
    check_model_files(p)
    return p


class ModelFileError(UserError):
    """A file of a model directory is broken (config.json not JSON, a truncated weights file, a missing shard) or
    the files do not fit together (a tokenizer with more tokens than the model has embeddings)."""


def check_model_files(p: Path) -> None:
    """config.json is a JSON object and every *.safetensors file is whole (its size is what its header says),
    before transformers reads them: their errors name neither the file nor the fault."""
    check_config_json(p / "config.json")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        if missing := sorted(shard for shard in shards if not (p / shard).is_file()):
            raise ModelFileError(f"{p / missing[0]}: missing ({index.name} lists {len(missing)} shard(s) not in "
                                 f"the directory)")
    for weights in sorted(p.glob("*.safetensors")):
        check_safetensors(weights)


def check_config_json(config: Path) -> None:
    """config.json is a JSON object (transformers' own error names neither the line nor the fault)."""
    try:
        if not isinstance(json.loads(config.read_bytes()), dict):
            raise ModelFileError(f"{config}: not a model config (a JSON object was expected)")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{config}: not valid UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{config}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def check_safetensors(path: Path) -> None:
    """A safetensors file holds an 8-byte header length, a JSON header giving each tensor's byte range, then the
    tensors: it is whole when its size is the end of the last range."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise ModelFileError(f"{path}: truncated or not a safetensors file ({size} bytes, less than its "
                                 f"header): copy it again")
        try:
            header = json.loads(f.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise ModelFileError(f"{path}: not a safetensors file (its header is not one)") from None
    if 8 + length + end > size:
        raise ModelFileError(f"{path}: truncated ({size} bytes; its header says {8 + length + end}): copy it again")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_dir(path: str | Path) -> Path:
    """A directory to load a tokenizer from: it exists and holds a tokenizer's files (never a hub id)."""
    p = Path(path)
    if not p.is_dir():
        raise ModelDirError(f"{p}: no such directory (a model or tokenizer directory was expected)")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"{p}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)})")
    if (p / "config.json").is_file():  # a tokenizer may read it too (AutoTokenizer does)
        check_config_json(p / "config.json")
    return p


def model_files(uri: str | Path, dest: str | Path | None = None) -> Path:
    """A local directory with the config and tokenizer files of the model at `uri`, without its weights: what a
    step that only reads those needs. A local directory as is; from an s3:// directory, every file but the
    weights is downloaded, to `dest` (default: a new temporary directory)."""
    import tempfile

    from components.storage import download, is_s3, not_weights

    if not is_s3(uri):
        return Path(str(uri).removeprefix("file://"))
    dest = Path(dest) if dest else Path(tempfile.mkdtemp(prefix="posttrain-model-")) / "model"
    return download(str(uri), dest, include=not_weights)


def resolve_attention(name: str = "auto") -> str:
    """"auto": flash-attention varlen on a GPU with flash-attn installed, else sdpa.

    Both mask packed sequences from their position ids (flash-attention through cu_seqlens, sdpa through a
    block-diagonal causal mask that transformers derives from them).
    """
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               attn_implementation: str = "auto", trust_remote_code: bool = False, quantization_config=None):
    """Load a causal LM from a Hugging Face directory, safetensors only, in `dtype` (default float32). With a
    `quantization_config` (bitsandbytes, QLoRA) the weights are quantized as they load, straight onto `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype

    p = check_model_dir(path)
    attn_implementation = resolve_attention(attn_implementation)
    quantized = {"quantization_config": quantization_config, "device_map": {"": str(device)}} \
        if quantization_config is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, **quantized,
        )
    except RuntimeError as e:  # shapes that differ: transformers logs the load report (which tensors) first
        if "mismatch" not in str(e):
            raise
        raise ModelFileError(f"{p}: the shapes of its *.safetensors weights differ from those its config.json "
                             f"gives (see the load report above; vocab_size?)") from e
    except (ValueError, KeyError) as e:  # a config.json transformers cannot build a model from (no model_type, ...)
        if isinstance(e, UserError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ModelFileError(f"{p}: cannot load the model ({type(e).__name__}: {first})") from e
    check_vocabulary(model, p, trust_remote_code)
    return model if quantized else model.to(device)


def check_vocabulary(model, path: Path, trust_remote_code: bool = False) -> None:
    """The tokenizer saved beside the model has no token id past the model's embeddings (fewer tokens than
    embedding rows is common: vocabularies are padded); a bigger one would fail mid-training, on the first
    such token, with `index out of range in self`."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return
    tokens = len(load_tokenizer(path, trust_remote_code))
    rows = model.get_input_embeddings().num_embeddings
    if tokens > rows:
        raise ModelFileError(f"{path}: its tokenizer has {tokens} tokens and the model embeds {rows} (ids "
                             f"{rows} to {tokens - 1} have no embedding): the tokenizer and the weights are of "
                             f"different models")


def load_scalar_model(path: str | Path, pad_token_id: int, *, attn_implementation: str = "auto",
                      trust_remote_code: bool = False):
    """A sequence-classification model with one label from `path`, safetensors only, in float32: a reward model, or
    a causal LM under a new score head (the reward_model stage's head scalar, ppo's critic)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        check_model_dir(path), num_labels=1, pad_token_id=pad_token_id, dtype=torch.float32, use_safetensors=True,
        trust_remote_code=trust_remote_code, attn_implementation=resolve_attention(attn_implementation))
    model.config.pad_token_id = pad_token_id
    return model


# tokenizer_class values that mean "exactly the tokenizer.json beside it"
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in a model directory, as saved.

    A directory whose tokenizer_config.json names the generic class (a tokenizer built with the `tokenizers`
    library, like the tiny model's) is loaded from its tokenizer.json as is: AutoTokenizer would pick the class
    of the model's type instead (Qwen2Tokenizer for a qwen2 config) and rebuild the tokenizer with that
    family's pre-tokenizer, which silently drops characters its vocabulary lacks (the spaces of "12 + 3").
    """
    from transformers import PreTrainedTokenizerFast  # AutoTokenizer's module imports torch: only when needed

    path = check_tokenizer_dir(path)
    cls = None
    try:
        cls = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        pass
    if cls in GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


__all__ = [
    "ModelDirError", "ModelFileError", "check_model_files", "check_config_json", "check_safetensors",
    "check_vocabulary", "check_tokenizer_dir", "build_char_tokenizer", "build_tiny_model", "check_model_dir",
    "load_model", "load_scalar_model", "load_tokenizer", "model_files", "resolve_attention", "tiny_config",
    "TINY_CONFIG"
]
