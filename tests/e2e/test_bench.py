"""The benchmark scripts keep running (tiny shape on CPU); their figures come from real runs."""

import importlib.util
import math
from pathlib import Path

import jax
import pytest

from grpo_jax.models import architecture
from grpo_jax.models import transformer

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_sampler_tiny(tmp_path):
    out = tmp_path / "bench.json"
    res = _load("bench_sampler").main(["--shape", "tiny", "--batch", "4", "--num_generations", "2",
                                       "--prompt_len", "8", "--new_tokens", "6", "--repeats", "1",
                                       "--out", str(out)])
    run = res["runs"][0]
    assert out.exists() and run["new_tokens_total"] == 24
    assert run["tokens_per_s"] > 0 and run["compile_s"] > 0 and 0 < run["roofline_fraction"]
    # Roofline by hand: batch / ((param bytes + batch * avg context * KV bytes per token) / bandwidth).
    kv = 2 * 2 * 2 * 16 * 4  # layers x kv_heads x head_dim x float32, keys and values
    want = 4 / ((res["param_bytes"] + 4 * (8 + 3) * kv) / (res["bandwidth_GBps"] * 1e9))
    assert abs(run["roofline_tokens_per_s"] - want) / want < 1e-9


def test_bench_sampler_lengths_tiny():
    """Forced long-tailed lengths: the sampler computes fewer row-steps than the static whole-cache
    batch, for the same tokens."""
    res = _load("bench_sampler").main(["--batch", "8", "--num_generations", "2", "--prompt_len", "8",
                                       "--new_tokens", "48", "--lengths", "lognormal:10:1.0", "--repeats", "1"])
    run = res["runs"][0]
    assert run["identical_tokens"] and run["tokens"] == round(run["mean_length"] * 8)
    static, new = run["static, whole cache"], run["sampler"]
    assert static["row_steps_per_token"] == 8 * run["max_length"] / run["tokens"]
    assert new["row_steps_per_token"] < static["row_steps_per_token"] and new["decode_calls"] > 1


@pytest.mark.xdist_group("sandbox")  # sandboxes: with the others (test_sandbox counts them)
def test_bench_rewards_small():
    res = _load("bench_rewards").main(["--n", "20", "--workers", "1"])
    assert res["n"] == 20 and res["pool_rewards_per_s"] > 0 and res["timeouts"] == 0
    assert 0.3 < res["mean_reward"] < 0.9  # about 60% of the generated answers are right


def test_bench_checkpoint_tiny():
    res = _load("bench_checkpoint").main(["--shape", "tiny", "--repeats", "1"])
    for mode in ("sync", "async"):
        assert 0 < res[mode]["blocked_s"] <= res[mode]["written_s"] and res[mode]["restore_s"] > 0


def test_bench_grpo_step_tiny(tmp_path):
    mod = _load("bench_grpo_step")
    res = mod.main(["--prompts", "2", "--num_generations", "2", "--prompt_len", "8", "--new_tokens", "6",
                    "--warmup", "1", "--steps", "1", "--out", str(tmp_path / "b.json")])
    run = res["runs"][0]
    assert run["batch"] == 4 and len(run["step_s"]) == 2
    # EOS disabled: every completion runs to the limit, so tokens per step are exact.
    assert run["completion_tokens_per_step"] == 4 * 6 and run["frac_truncated"] == 1.0
    split = run["split_s"]
    assert all(v > 0 for v in split.values()) and run["other_s"] >= 0  # beta > 0: a reference pass ran
    assert math.isclose(sum(split.values()) + run["other_s"], run["median_step_s"], rel_tol=1e-9)
    assert run["compile_s"] > 0 and run["update_tflops"] > 0 and run["peak_memory_gib"] is None  # CPU
    # A named shape keeps its own vocabulary (tiny: 512 rows; the 99-character tokenizer decodes).
    assert run["vocab_size"] == 512 and run["params"] == architecture.SHAPES["tiny"].num_params
    assert [mod.tokenizer_for(architecture.SHAPES[s].vocab_size) for s in ("smollm2-135m", "qwen2.5-0.5b", "mistral-7b")] == \
        ["smollm2", "qwen2", "char"]


def test_update_flops_against_a_count_over_the_parameter_tree():

    mod = _load("bench_grpo_step")
    for name in ("tiny", "qwen2.5-0.5b"):
        cfg = architecture.SHAPES[name]
        # Every kernel and the (tied) embedding is a matmul weight; biases and norm scales are not.
        weights = sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(transformer.param_shapes(cfg))
                      if jax.tree_util.keystr(path).endswith(("['kernel']", "['embedding']")))
        B, S = 3, 20
        attention = 2 * 2 * 3 * cfg.num_layers * cfg.num_heads * cfg.head_dim * S * S / 2  # QK^T, AV; fwd+bwd
        assert mod.update_flops(cfg, B, S) == B * (6 * weights * S + attention)


def test_bench_grpo_update_memory_ahead_of_time():
    res = _load("bench_grpo_step").main(["--memory_only", "--prompts", "2", "--num_generations", "2",
                                         "--prompt_len", "8", "--new_tokens", "6", "--dtype", "bfloat16"])
    run = res["runs"][0]
    assert run["update_temp_gib"] > 0 and run["update_peak_estimate_gib"] >= run["update_arguments_gib"]
    # bf16 compute, float32 master weights: the parameters and AdamW's two float32 moments, plus a few
    # scalars (step counts, the injected hyperparameters).
    state_bytes = run["params_and_optimizer_gib"] * 2**30
    assert 3 * 4 * run["params"] <= state_bytes < 3 * 4 * run["params"] + 64


def test_bench_grpo_step_layouts_padded_against_packed():
    res = _load("bench_grpo_step").main(["--layouts", "--prompts", "4", "--num_generations", "8", "--prompt_len", "24",
                                         "--prompt_bucket", "32", "--new_tokens", "32", "--lengths", "lognormal:8:0.6",
                                         "--warmup", "1", "--steps", "1"])
    run, = res["runs"]
    # The tiny model's attention is dear next to its matmuls: the plan takes short rows and splits groups.
    assert run["padded"]["tokens_per_unique"] > 5 and run["packed"]["tokens_per_unique"] < 1.3
    # The cost analysis of loop-free copies: the packed update computes several times fewer FLOPs.
    assert run["flops_ratio"] > 2 and run["packed"]["temp_gib"] < run["padded"]["temp_gib"]
    assert run["update_speedup"] > 0 and run["programs_over_50_steps"]["packed"] <= 16
    lo, mean, hi = run["packed_tokens_per_unique_over_50_steps"]
    assert 1 <= lo <= mean <= hi < 1.6


def test_bench_layout_tiny(tmp_path):
    """The AOT layout benchmark on 8 simulated devices (a subprocess: the device count is fixed when
    JAX starts): ZeRO-3 traffic, the head on 1/8 of the tokens, no weight gathers while decoding."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "layout.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_layout.py"), "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    u = res["update"]
    assert 0.8 < u["collective_over_ideal"] < 1.2, u
    assert u["head_rows_per_device_per_microbatch"] * 8 == u["head_rows_of_microbatch"]
    assert u["parameters_GiB"] > 0 and u["temporaries_GiB"] > 0
    assert res["sampling"]["decode_loop_weight_all_gathers"] == 0


@pytest.mark.slow  # ~18 s on 2 cores: a LoRA and a full run side by side
def test_bench_lora_tiny():
    """LoRA in the benchmarks: the update of a LoRA state (adapters trained, base frozen in bf16)
    compiled for one device needs less than the full fine-tune's, whose state is 3 float32 copies of
    the model; the sampler's unmerged/merged comparison runs and the merged copy drifts in bf16 only."""
    layout = _load("bench_layout")
    args = ["--mesh", "1,1,1", "--dtype", "bfloat16", "--skip", "sampling"]
    full, lora = layout.main(args), layout.main(args + ["--lora_rank", "4"])
    assert lora["update"]["frozen_base_GiB"] > 0 and full["update"]["frozen_base_GiB"] == 0
    assert lora["update"]["optimizer_state_GiB"] < 0.1 * full["update"]["optimizer_state_GiB"]
    assert lora["update"]["peak_GiB"] < full["update"]["peak_GiB"]
    assert lora["reference"]["with_resident_state_GiB"] < full["reference"]["with_resident_state_GiB"]
    res = _load("bench_sampler").main(["--lora_rank", "4", "--batch", "4", "--prompt_len", "8", "--new_tokens", "8",
                                       "--repeats", "1"])
    r = res["lora"]
    assert r["step_ms_unmerged"] > 0 and r["step_ms_merged"] > 0 and r["merge_s"] > 0
    assert r["merged_logp_drift_max"] < 1e-4  # float32: merging only reorders the sums


def test_bench_multi_turn_tiny():
    res = _load("bench_multi_turn").main(["--prompts", "2", "--num_generations", "4", "--new_tokens", "48",
                                          "--repeats", "1", "--sleep", "0.05"])
    assert res["calls"] > 0 and res["prefill_per_unique"] <= 1.0 < res["reprefill_per_unique"]
    assert res["logp_diff_episodes"] < 1e-5 and res["logp_diff_single_turn"] < 1e-5
