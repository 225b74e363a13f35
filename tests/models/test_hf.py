"""Checkpoint I/O: save_hf round trips through transformers; bad folders fail with a clear message."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import left_padded_batch, tiny_hf_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from grpo_jax.models import hf
from grpo_jax.models import placement
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning


def _logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=torch.as_tensor(ids),
                     attention_mask=torch.as_tensor(mask.astype(np.int64))).logits.float().numpy()


def test_round_trip_through_transformers(hf_checkpoint, tmp_path):
    hf_model, folder = hf_checkpoint
    params, cfg = hf.load_hf(folder)
    out = hf.save_hf(params, cfg, tmp_path / "out")
    moe = {"experts_implementation": "eager"} if cfg.num_experts else {}  # see conftest.tiny_hf_model
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **moe).eval()
    assert type(back) is type(hf_model)
    ids, mask = left_padded_batch(cfg.vocab_size, [10, 6])
    np.testing.assert_array_equal(_logits(back, ids, mask), _logits(hf_model, ids, mask))
    # And back into JAX: identical parameters.
    params2, cfg2 = hf.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_bf16_checkpoint(tmp_path):
    tiny_hf_model("qwen2").save_pretrained(tmp_path / "src")
    params, cfg = hf.load_hf(tmp_path / "src", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = hf.save_hf(params, cfg, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    with safe_open(out / shards[0], framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.dtype == torch.bfloat16
    ids, mask = left_padded_batch(cfg.vocab_size, [8, 8])
    ours, _ = transformer.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), _logits(back, ids, mask), atol=0.1)
    params2, _ = hf.load_hf(out, dtype="bfloat16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 params2, params)


def test_weights_are_read_and_written_by_the_safetensors_library(tmp_path, monkeypatch):
    """save_hf writes through safetensors (bfloat16 via ml_dtypes) and load_hf reads through it:
    what the library writes, we read exactly, and the reverse."""
    params, cfg = hf.load_hf(_tiny_folder(tmp_path / "src"), dtype="bfloat16")
    out = hf.save_hf(params, cfg, tmp_path / "out")
    theirs = load_file(out / "model.safetensors")  # the library's own reader
    assert theirs["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(theirs["model.embed_tokens.weight"], np.asarray(params["embedding"]))
    # Tensors the library writes (a changed weight) come back through load_hf unchanged.
    theirs["model.norm.weight"] = np.linspace(-3, 3, cfg.hidden_size).astype(ml_dtypes.bfloat16)
    save_file(theirs, out / "model.safetensors", metadata={"format": "pt"})
    back, _ = hf.load_hf(out, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(back["final_norm"]["scale"]), theirs["model.norm.weight"])
    # No hand-written format code is left to drift from the reference implementation.
    assert not any(hasattr(hf, name) for name in ("read_safetensors", "write_safetensors", "read_safetensors_header"))
    calls = []
    real = hf.safetensors.safe_open
    monkeypatch.setattr(hf.safetensors, "safe_open", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    hf.load_hf(out)
    assert calls == [out / "model.safetensors"]


def _tiny_folder(path):
    tiny_hf_model("qwen2").save_pretrained(path)
    return path


def test_load_places_on_given_shardings(hf_checkpoint):

    _, folder = hf_checkpoint
    cfg = hf.config_from_hf(json.loads((folder / "config.json").read_text()))
    mesh = partitioning.make_mesh()
    shardings = placement.param_shardings(cfg, mesh)
    params, _ = hf.load_hf(folder, shardings=shardings)
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, params, shardings))


# ---- bad folders --------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(folder, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder_and_files(good, tmp_path):
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        hf.load_hf(tmp_path / "nope")
    (good / "model.safetensors").unlink()
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        hf.load_hf(good)
    (good / "config.json").unlink()
    with pytest.raises(hf.CheckpointError, match="missing config.json"):
        hf.load_hf(good)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(hf.CheckpointError, match="could not fetch 'no-such-org/no-such-model'"):
        hf.load_hf("no-such-org/no-such-model")


def test_unknown_architecture(good):
    _edit_config(good, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(hf.CheckpointError, match="unknown architecture: model_type='gpt2'"):
        hf.load_hf(good)


def test_wrong_shapes(good):
    _edit_config(good, intermediate_size=128)  # config no longer matches the weights
    with pytest.raises(hf.CheckpointError, match=r"mlp.gate_proj.weight' has shape \(96, 64\), expected \(128, 64\)"):
        hf.load_hf(good)


def test_missing_and_unexpected_tensors(good):
    tensors = load_file(good / "model.safetensors")
    tensors.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(tensors, good / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"missing 1 tensors.*layers.1.self_attn.k_proj"):
        hf.load_hf(good)
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.zeros((16,), np.float32)
    save_file(tensors, good / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match="does not use.*q_norm"):
        hf.load_hf(good)


def test_corrupt_file_and_bad_index(good):
    (good / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(hf.CheckpointError, match="not a safetensors file"):
        hf.load_hf(good)
    (good / "model.safetensors").unlink()
    (good / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match="lists shards that do not exist"):
        hf.load_hf(good)


def test_sliding_window_layers_from_either_config_layout(tmp_path):
    tiny_hf_model("qwen2").save_pretrained(tmp_path)
    # transformers 5 lists layer_types; with them all full, use_sliding_window changes nothing (as there)
    _edit_config(tmp_path, use_sliding_window=True, sliding_window=8)
    assert hf.load_config(tmp_path).sliding_layers == (False, False, False)
    # a transformers 4 config: the layers from max_window_layers on slide
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "max_window_layers": 1}))
    loaded = hf.load_config(tmp_path)
    assert loaded.sliding_layers == (False, True, True) and loaded.sliding_window == 8
    _edit_config(tmp_path, layer_types=["full_attention", "chunked_attention", "sliding_attention"])
    with pytest.raises(hf.CheckpointError, match="layer_types .* are not supported"):
        hf.load_hf(tmp_path)
