"""Checkpoint loading: GGUF and HF safetensors give the tensors transformers loads (Q/K
un-permuted for llama GGUF), the torch dequantizers equal gguf's bit for bit, the converted-GGUF
cache round-trips, and every broken input is a one-line ModelLoadError naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file, save_file

from picochat.errors import ModelLoadError
from picochat.model.gguf_dequant import BLOCK_BYTES, dequantize, dequantize_blocks
from picochat.model.gguf_loader import config_from_gguf, open_gguf, read_gguf_tensors, unpermute_order
from picochat.model import loader
from picochat.model.loader import converted_path, expected_shapes, load_checkpoint


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def bits(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 values as int32 bit patterns: equal bits, not merely equal values."""
    t = torch.from_numpy(np.array(t)) if isinstance(t, np.ndarray) else t
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------------------- dequantizers

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantizers_equal_gguf_on_encoded_and_random_blocks(qtype: str) -> None:
    gen = np.random.default_rng(0)
    encoded = gguf.quants.quantize(gen.normal(0, 2, (24, 96)).astype(np.float32), GGMLQuantizationType[qtype])
    random = gen.integers(0, 256, (24, 3 * BLOCK_BYTES[qtype]), dtype=np.uint8)
    blocks = random.reshape(24, 3, -1)  # a view: 3 blocks per row
    blocks[..., 0:2] = gen.uniform(-4, 4, (24, 3, 1)).astype(np.float16).view(np.uint8)  # a finite d
    if qtype == "Q4_1":
        blocks[..., 2:4] = gen.uniform(-4, 4, (24, 3, 1)).astype(np.float16).view(np.uint8)  # and m
    for raw in (encoded, random):
        theirs = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype])
        ours = dequantize(raw, GGMLQuantizationType[qtype], (24, 96))
        assert torch.equal(bits(ours), bits(theirs))
        blocks = torch.from_numpy(raw.copy()).reshape(24, 3, BLOCK_BYTES[qtype])
        assert torch.equal(bits(dequantize_blocks(blocks, qtype)), bits(theirs))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantized_blocks_stay_on_their_device(qtype: str) -> None:
    """A live quantization switch dequantizes blocks already moved to the GPU; the meta device
    stands in for it here (a tensor made on the CPU instead cannot take the meta values)."""
    blocks = torch.zeros(2, 3, BLOCK_BYTES[qtype], dtype=torch.uint8, device="meta")
    out = dequantize_blocks(blocks, qtype)
    assert out.device.type == "meta" and out.shape == (2, 96) and out.dtype == torch.float32


def test_float_types_and_the_gguf_fallback_equal_gguf() -> None:
    gen = np.random.default_rng(1)
    values = gen.normal(0, 3, (4, 64)).astype(np.float32)
    for qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                  GGMLQuantizationType.Q5_0):
        raw = gguf.quants.quantize(values, qtype)
        assert torch.equal(bits(dequantize(raw, qtype, (4, 64))), bits(gguf.quants.dequantize(raw, qtype)))


@pytest.mark.slow
def test_dequantizers_equal_gguf_on_the_default_models_tensors(default_model_path: Path) -> None:
    reader = open_gguf(default_model_path)
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q4_1", "Q8_0"}
    for t in reader.tensors[:20]:  # token_embd (Q8_0), then blk.0 and blk.1 (Q4_1, F32)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        assert torch.equal(bits(dequantize(t.data, t.tensor_type, shape)), bits(theirs)), t.name


# ---------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("PICOCHAT_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def default_checkpoint(default_model_path: Path, private_cache: Path):
    """The default model in fp32, converted into a private cache dir (a cold load)."""
    return load_checkpoint(default_model_path, torch.float32)


@pytest.mark.slow
def test_default_gguf_loads_with_the_shapes_its_config_implies(default_checkpoint) -> None:
    ckpt = default_checkpoint
    cfg = ckpt.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (100000.0, 8192, True)
    assert ckpt.format == "gguf" and ckpt.quantized == {}
    assert {n: tuple(t.shape) for n, t in ckpt.tensors.items()} == expected_shapes(cfg)
    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    assert sum(t.numel() for t in ckpt.tensors.values()) == cfg.num_parameters() == 134_515_008
    assert ckpt.tokenizer.encode("<|im_start|>") == [1]


@pytest.mark.slow
def test_default_gguf_tensors_equal_what_transformers_loads(default_checkpoint, default_model_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32)
    hf_tensors = hf.state_dict()
    for name, ours in default_checkpoint.tensors.items():  # Q/K un-permuted: bit-equal, not close
        assert torch.equal(ours, hf_tensors[name]), name
    raw_q = next(t for t in open_gguf(default_model_path).tensors if t.name == "blk.0.attn_q.weight")
    stored_rows = torch.from_numpy(gguf.quants.dequantize(raw_q.data, raw_q.tensor_type))
    assert not torch.equal(hf_tensors["model.layers.0.self_attn.q_proj.weight"], stored_rows)  # permuted on disk


@pytest.mark.slow
def test_converted_cache_is_written_once_and_reloads_equal(default_checkpoint, default_model_path: Path,
                                                          private_cache: Path) -> None:
    converted = converted_path(default_model_path, torch.float32)
    assert converted.parent == private_cache / "converted"
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temp file left
    warm = load_checkpoint(default_model_path, torch.float32)
    assert warm.tensors.keys() == default_checkpoint.tensors.keys()
    for name, t in default_checkpoint.tensors.items():
        assert torch.equal(warm.tensors[name], t), name
    assert warm.config == default_checkpoint.config  # from the cache, without opening the GGUF
    chat = [{"role": "user", "content": "Hi there 🙂, 日本語?"}]
    cold_tok, warm_tok = default_checkpoint.tokenizer, warm.tokenizer
    assert warm_tok.encode_chat(chat) == cold_tok.encode_chat(chat)
    assert (warm_tok.stop_token_ids, warm_tok.bos_token_id) == (cold_tok.stop_token_ids, cold_tok.bos_token_id)
    override = load_checkpoint(default_model_path, torch.float32, chat_template="{{ messages[0]['content'] }}")
    assert override.tokenizer.render_chat(chat) == chat[0]["content"]

    converted.write_bytes(b"not safetensors")  # a corrupt cache is converted again, not an error
    again = load_checkpoint(default_model_path, torch.float32)
    assert torch.equal(again.tensors["model.norm.weight"], default_checkpoint.tensors["model.norm.weight"])
    assert torch.equal(load_file(converted)["model.norm.weight"], default_checkpoint.tensors["model.norm.weight"])


@pytest.mark.slow
def test_quantized_load_is_cached_with_its_raw_blocks(default_model_path: Path, private_cache: Path,
                                                      monkeypatch) -> None:
    cold = load_checkpoint(default_model_path, torch.bfloat16, keep_quantized=True)
    assert converted_path(default_model_path, torch.bfloat16, keep_quantized=True).is_file()

    def no_parse(path):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(loader, "open_gguf", no_parse)
    warm = load_checkpoint(default_model_path, torch.bfloat16, keep_quantized=True)
    assert warm.config == cold.config and warm.tensors.keys() == cold.tensors.keys()
    assert warm.quantized.keys() == cold.quantized.keys() and len(warm.quantized) == 210
    for name, q in cold.quantized.items():
        w = warm.quantized[name]
        assert (w.qtype, w.shape) == (q.qtype, q.shape) and torch.equal(w.data, q.data), name
    for name, t in cold.tensors.items():
        assert torch.equal(warm.tensors[name], t), name


@pytest.mark.slow
def test_keep_quantized_returns_raw_linear_blocks_in_hf_row_order(default_checkpoint,
                                                                    default_model_path: Path) -> None:
    ckpt = load_checkpoint(default_model_path, torch.float32, keep_quantized=True)
    assert len(ckpt.quantized) == 210 and not ckpt.quantized.keys() & ckpt.tensors.keys()
    assert "model.embed_tokens.weight" in ckpt.tensors and "model.layers.0.input_layernorm.weight" in ckpt.tensors
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.7.mlp.down_proj.weight"):
        q = ckpt.quantized[name]
        assert q.qtype == "Q4_1" and q.data.dtype == torch.uint8
        assert tuple(q.data.shape) == (q.shape[0], q.shape[1] // 32, 20)
        assert torch.equal(q.dequantize(), default_checkpoint.tensors[name]), name


# ---------------------------------------------------------------------------- synthetic GGUF files

def llama_cpp_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's ``permute`` (HF rotate-half rows → interleaved pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf_dir: Path, arch: str, qtype: GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """Convert a tiny HF checkpoint the way llama.cpp does; return the HF tensors it came from."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    for name, t in tensors.items():
        stem, kind = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            _, _, i, sub = stem.split(".", 3)
            gguf_name = f"blk.{i}.{layer_names[sub]}.{kind}"
        else:
            gguf_name = f"{names[stem]}.{kind}"
        if arch == "llama" and ("attn_q" in gguf_name or "attn_k" in gguf_name):
            heads = cfg["num_attention_heads"] if "attn_q" in gguf_name else cfg["num_key_value_heads"]
            t = llama_cpp_permute(t, heads)
        data = t.numpy()
        if t.ndim == 2 and "token_embd" not in gguf_name:
            data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_q_and_k_come_back_in_hf_row_order(arch: str, tiny_hf_llama_dir, tiny_hf_qwen2_dir,
                                                tmp_path: Path) -> None:
    hf_dir = (tiny_hf_llama_dir if arch == "llama" else tiny_hf_qwen2_dir)()
    path = tmp_path / "tiny.gguf"
    hf_tensors = write_gguf(path, hf_dir, arch, GGMLQuantizationType.F32)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    assert (config.architecture, config.rope_theta, config.attention_bias) == (arch, 5000.0, arch == "qwen2")
    tensors, quantized = read_gguf_tensors(reader, config, path, torch.float32, keep_quantized=False)
    assert quantized == {} and tensors.keys() == hf_tensors.keys()
    for name, t in hf_tensors.items():
        assert torch.equal(tensors[name], t), name


def test_gguf_raw_blocks_are_unpermuted_like_the_dequantized_rows(tiny_hf_llama_dir, tmp_path: Path) -> None:
    path = tmp_path / "tiny-q8.gguf"
    hf_tensors = write_gguf(path, tiny_hf_llama_dir(), "llama", GGMLQuantizationType.Q8_0)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    full, _ = read_gguf_tensors(reader, config, path, torch.float32, keep_quantized=False)
    rest, quantized = read_gguf_tensors(reader, config, path, torch.float32, keep_quantized=True)
    assert sorted(rest) == sorted(n for n in hf_tensors if n.endswith("norm.weight") or "embed" in n)
    for name, q in quantized.items():
        assert q.qtype == "Q8_0" and torch.equal(q.dequantize(), full[name]), name
        assert torch.allclose(full[name], hf_tensors[name], atol=0.02), name  # Q8_0 rounding only


def test_unpermute_order_inverts_llama_cpp_permute() -> None:
    w = torch.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3):
        assert torch.equal(llama_cpp_permute(w, heads)[unpermute_order(24, heads)], w)


# ---------------------------------------------------------------------------- HF folders

@pytest.mark.parametrize("arch, tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_hf_folder_loads_the_tensors_transformers_loads(arch: str, tie: bool, tiny_hf_llama_dir,
                                                        tiny_hf_qwen2_dir) -> None:
    transformers = pytest.importorskip("transformers")
    folder = (tiny_hf_llama_dir if arch == "llama" else tiny_hf_qwen2_dir)(tie=tie)
    ckpt = load_checkpoint(folder, torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    if tie:
        del hf["lm_head.weight"]
    assert ckpt.tensors.keys() == hf.keys() and ckpt.format == "safetensors" and ckpt.source == folder
    for name, t in ckpt.tensors.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, hf[name].to(torch.bfloat16)), name
    cfg = ckpt.config
    assert (cfg.architecture, cfg.tie_word_embeddings, cfg.attention_bias) == (arch, tie, arch == "qwen2")
    assert (cfg.rope_theta, cfg.num_kv_heads, cfg.head_dim) == (5000.0, 2, 16)
    assert ckpt.tokenizer.encode("<|im_end|>") == [255]


def test_sharded_safetensors_load_like_a_single_file(tiny_hf_llama_dir, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_hf_llama_dir(), folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:7], names[7:15], names[15:])):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_checkpoint(folder).tensors
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], tensors[n]) for n in names)

    (folder / "model-00002-of-00003.safetensors").unlink()
    assert "shard model-00002-of-00003.safetensors is missing" in load_error(folder)


# ---------------------------------------------------------------------------- broken inputs

def test_missing_and_garbage_files_are_load_errors(tmp_path: Path) -> None:
    assert "no such file" in load_error(tmp_path / "nope.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a valid GGUF file" in load_error(garbage)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    assert "not a .gguf file or a Hugging Face model folder" in load_error(other)
    assert "no config.json" in load_error(tmp_path)


def test_truncated_gguf_is_a_load_error(default_model_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    assert "truncated" in load_error(truncated)


def test_gguf_of_an_unsupported_architecture_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "unsupported architecture 'gpt2'" in load_error(path)


def hf_copy(tiny_hf_llama_dir, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_llama_dir(), folder)
    return folder


def test_a_wrong_tensor_shape_is_a_load_error(tiny_hf_llama_dir, tmp_path: Path) -> None:
    folder = hf_copy(tiny_hf_llama_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # 2 KV heads × 16 = 32 rows
    save_file(tensors, folder / "model.safetensors")
    message = load_error(folder)
    assert "model.layers.1.self_attn.k_proj.weight has shape [64, 64], but config implies [32, 64]" in message


def test_a_missing_tensor_is_a_load_error(tiny_hf_llama_dir, tmp_path: Path) -> None:
    folder = hf_copy(tiny_hf_llama_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    assert "missing tensor model.layers.0.mlp.up_proj.weight" in load_error(folder)


def test_an_unknown_model_type_is_a_load_error(tiny_hf_llama_dir, tmp_path: Path) -> None:
    folder = hf_copy(tiny_hf_llama_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    assert "unsupported architecture 'gpt2'" in load_error(folder)


def test_a_truncated_safetensors_file_is_a_load_error(tiny_hf_llama_dir, tmp_path: Path) -> None:
    folder = hf_copy(tiny_hf_llama_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert "not a valid safetensors file, or truncated" in load_error(folder)


def test_a_gguf_tensor_of_the_wrong_shape_is_a_load_error(tiny_hf_llama_dir, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PICOCHAT_CACHE_DIR", str(tmp_path / "cache"))
    folder = hf_copy(tiny_hf_llama_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the metadata will say 4 KV heads; the weights have 2
    (folder / "config.json").write_text(json.dumps(config))
    path = tmp_path / "bad.gguf"
    write_gguf(path, folder, "llama", GGMLQuantizationType.F32)
    message = load_error(path)
    assert "model.layers.0.self_attn.k_proj.weight has shape [32, 64], but config implies [64, 64]" in message
    assert not (tmp_path / "cache").exists()  # nothing cached from a broken file
