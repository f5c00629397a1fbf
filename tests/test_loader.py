"""Config parsing, checkpoint loading and its error messages, device/dtype resolution."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.api import EngineError, UnsupportedError
from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from engine.device import resolve_device, resolve_dtype
from engine.kv_cache import PagedKVCache
from engine.layers.attention import AttentionMetadata
from engine.loader import load_model
from engine.models import get_model_class, supported_architectures
from tests.checkpoints import LLAMA3_ROPE, tiny_checkpoint, tiny_checkpoint_copy

_DROP = object()


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    file.write_text(json.dumps(cfg))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_matches_checkpoint(architecture: str) -> None:
    cfg = ModelConfig.from_pretrained(tiny_checkpoint(architecture))
    assert cfg.architecture in SUPPORTED_ARCHITECTURES
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
    assert cfg.head_dim == (32 if architecture == "qwen3" else 16)
    assert cfg.attention_bias == (architecture == "qwen2")
    assert cfg.qk_norm == (architecture == "qwen3")
    assert cfg.tie_word_embeddings == architecture.startswith("qwen")
    assert cfg.rope == RopeConfig(theta=10000.0)
    assert cfg.eos_token_ids == (2, 0)  # config's <|im_end|>, then generation_config's extra
    assert cfg.sliding_window is None and cfg.torch_dtype == "float32"


def test_registry_and_config_agree() -> None:
    assert supported_architectures() == tuple(sorted(SUPPORTED_ARCHITECTURES))


def test_legacy_rope_keys_parse_like_rope_parameters() -> None:
    base = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    new = ModelConfig.from_dict({**base, "rope_parameters": LLAMA3_ROPE})
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy["rope_theta"] = LLAMA3_ROPE["rope_theta"]
    legacy["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert ModelConfig.from_dict(legacy).rope == new.rope
    assert new.rope.rope_type == "llama3" and new.rope.original_max_position_embeddings == 64
    linear = ModelConfig.from_dict({**legacy, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope == RopeConfig(theta=10000.0, rope_type="linear", factor=2.0)


def test_sliding_window_rules() -> None:
    qwen = json.loads((tiny_checkpoint("qwen2") / "config.json").read_text())
    assert ModelConfig.from_dict({**qwen, "sliding_window": 8}).sliding_window is None
    on = ModelConfig.from_dict(
        {
            **qwen,
            "use_sliding_window": True,
            "sliding_window": 8,
            "layer_types": None,
            "max_window_layers": 1,
        }
    )
    assert on.sliding_window == 8 and on.sliding_window_layers == (1,)
    assert on.layer_sliding_window(0) is None and on.layer_sliding_window(1) == 8
    mistral = json.loads((tiny_checkpoint("mistral") / "config.json").read_text())
    assert ModelConfig.from_dict({**mistral, "sliding_window": 8}).sliding_window_layers == (0, 1)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            UnsupportedError,
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            UnsupportedError,
            "'yarn'",
        ),
        (
            {"rope_parameters": _DROP, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            UnsupportedError,
            "'dynamic'",
        ),
        ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act 'gelu'"),
        ({"hidden_size": _DROP}, ValueError, "config.json: required key 'hidden_size' is missing"),
        ({"num_hidden_layers": "2"}, ValueError, "'num_hidden_layers' must be int, got '2'"),
        ({"tie_word_embeddings": 1}, ValueError, "'tie_word_embeddings' must be bool"),
        ({"architectures": []}, ValueError, "'architectures' must be a non-empty list"),
        ({"num_key_value_heads": 3}, ValueError, "not a multiple of 3 KV heads"),
    ],
)
def test_bad_configs_fail_clearly(tmp_path: Path, changes: dict, error: type, match: str) -> None:
    path = tiny_checkpoint_copy(tmp_path, "qwen2")
    _edit_config(path, **changes)
    with pytest.raises(error, match=re.escape(match)):
        load_model(path, torch.float32, "cpu")


def test_missing_or_broken_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_get_model_class_lists_supported() -> None:
    with pytest.raises(UnsupportedError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        get_model_class("FalconForCausalLM")


# --- weights ----------------------------------------------------------------------------


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    path = tiny_checkpoint_copy(tmp_path, "llama")
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(name, t[name][:100].clone()))
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[100, 64\].*\[128, 64\]",
    ):
        load_model(path, torch.float32, "cpu")


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    path = tiny_checkpoint_copy(tmp_path, "llama")
    _edit_tensors(path, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensors \[model\.layers\.0\.self_attn\.k_proj\.weight\]"
    ):
        load_model(path, torch.float32, "cpu")
    _edit_tensors(
        path,
        lambda t: t.update(
            {
                "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64),
                "model.layers.2.mlp.up_proj.weight": torch.zeros(1),
            }
        ),
    )
    with pytest.raises(
        ValueError, match=r"unexpected tensors \[model\.layers\.2\.mlp\.up_proj\.weight\]"
    ):
        load_model(path, torch.float32, "cpu")


def test_harmless_extras_are_ignored(tmp_path: Path) -> None:
    path = tiny_checkpoint_copy(tmp_path, "qwen2")  # tied: lm_head.weight may still be stored
    _edit_tensors(
        path,
        lambda t: t.update(
            {"lm_head.weight": torch.zeros(512, 64), "model.rotary_emb.inv_freq": torch.zeros(8)}
        ),
    )
    model = load_model(path, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.abs().sum() > 0


def test_sharded_and_unindexed_checkpoints(tmp_path: Path) -> None:
    reference = load_model(tiny_checkpoint("qwen2"), torch.float32, "cpu").state_dict()
    sharded = load_model(tiny_checkpoint("qwen2", shards=3), torch.float32, "cpu").state_dict()
    assert sharded.keys() == reference.keys()
    assert all(torch.equal(sharded[k], reference[k]) for k in reference)

    path = tiny_checkpoint_copy(tmp_path, "qwen2", shards=3)
    (path / "model.safetensors.index.json").unlink()  # every *.safetensors is read
    assert load_model(path, torch.float32, "cpu").state_dict().keys() == reference.keys()
    first = sorted(path.glob("*.safetensors"))[0]
    save_file(load_file(first), path / "extra.safetensors")
    with pytest.raises(ValueError, match="is in both"):
        load_model(path, torch.float32, "cpu")


def test_index_pointing_to_missing_file(tmp_path: Path) -> None:
    path = tiny_checkpoint_copy(tmp_path, "qwen2", shards=2)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors, which is missing"):
        load_model(path, torch.float32, "cpu")


def test_untied_head_and_bf16_cast() -> None:
    model = load_model(tiny_checkpoint("llama"), torch.bfloat16, "cpu")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    c = model.config
    PagedKVCache(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim, torch.bfloat16, "cpu").bind(model)
    meta = AttentionMetadata.build([3], [3], [[0]], 16, "cpu")
    with torch.inference_mode():
        hidden = model(torch.tensor([5, 6, 7]), torch.arange(3), meta)
        logits = model.compute_logits(hidden)
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


# --- device and dtype -------------------------------------------------------------------


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    assert resolve_dtype("auto", "bfloat16", cpu) == torch.float32
    assert resolve_dtype("float16", "bfloat16", cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", None, cpu)


def test_auto_dtype_on_the_cpu_follows_the_int_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Int-quantized weights (AWQ, GPTQ, GGUF blocks) get bf16 activations where the CPU has
    native bf16 (their kernels' dtype); float32 elsewhere and for plain weights; an explicit
    dtype always wins."""
    import engine.device

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(engine.device, "cpu_has_bf16_kernels", lambda native=native: native)
        assert resolve_dtype("auto", None, cpu, int_weights=True) == (torch.bfloat16 if native else torch.float32)
        assert resolve_dtype("auto", "bfloat16", cpu, int_weights=False) == torch.float32
        assert resolve_dtype("float32", None, cpu, int_weights=True) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_dtype_on_gpu() -> None:
    gpu = torch.device("cuda")
    assert resolve_dtype("auto", "float16", gpu) == torch.float16
    assert resolve_dtype("auto", "float32", gpu) in (torch.bfloat16, torch.float16)
