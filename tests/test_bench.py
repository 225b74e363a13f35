"""The benchmark scripts keep running (tiny shape on CPU); their figures come from real runs."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


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


def test_bench_rewards_small():
    res = _load("bench_rewards").main(["--n", "20", "--workers", "1"])
    assert res["n"] == 20 and res["pool_rewards_per_s"] > 0 and res["timeouts"] == 0
    assert 0.3 < res["mean_reward"] < 0.9  # about 60% of the generated answers are right
