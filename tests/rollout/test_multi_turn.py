"""Multi-turn rollouts with tools: token in, token out, each row's KV cache kept across its calls,
observation tokens out of the loss; the tools, their schemas and the call formats."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.models import architecture
from grpo_jax.models import pretrained
from grpo_jax.models import tokenizer
from grpo_jax.models import transformer
from grpo_jax.rl import logprobs
from grpo_jax.rl import loss
from grpo_jax.rl import objective
from grpo_jax.rl import packing
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats
from grpo_jax.rollout import tools

TOK = tokenizer.CharTokenizer()


class EveryParen(tool_formats.Plain):
    """A format a random model uses often: a turn ending at ")" calls `tool` on "6*7" when it has an
    odd number of characters, and is malformed otherwise."""

    name, call_end = "every_paren", ")"

    def __init__(self, tool="calculator"):
        self.tool = tool

    def calls(self, turn):
        if turn.endswith(")"):
            return [tool_formats.Call(self.tool, "6*7") if len(turn) % 2 else "error: odd"]
        return []


SAMPLING = sampler.SamplingConfig(max_new_tokens=48, eos_ids=(2,), prompt_buckets=(16,), first_segment=16)
PROMPTS = [TOK.encode("12*34="), TOK.encode("7+8="), TOK.encode("99-1=")]


@pytest.fixture(scope="module")
def model():
    cfg = architecture.SHAPES["tiny"].replace(vocab_size=TOK.vocab_size)
    return transformer.init_params(cfg, jax.random.key(0)), cfg


def runner(fmt=None, box=None, **budgets):
    budgets = {"max_turns": 3, "max_observation_tokens": 8, **budgets}
    return multi_turn.ToolRunner(box or tools.ToolBox([tools.calculator]), fmt or EveryParen(), TOK,
                                 multi_turn.Budgets(**budgets))


@pytest.fixture(scope="module")
def episodes(model):
    params, cfg = model
    r = runner()
    rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r)
    return rollout, stats, r


# ---- tools ---------------------------------------------------------------------------------------


def test_a_tool_is_a_function_its_schema_from_hints_and_docstring():
    def lookup(word: str, limit: int = 3) -> str:
        """Define a word.

        Args:
          word: the word to define.
          limit: at most this many senses.
        """
        return f"{word}: {limit}"

    t = tools.Tool.of(lookup)
    assert t.schema() == {"type": "function", "function": {
        "name": "lookup", "description": "Define a word.",
        "parameters": {"type": "object", "required": ["word"], "properties": {
            "word": {"type": "string", "description": "the word to define."},
            "limit": {"type": "integer", "description": "at most this many senses."}}}}}
    box = tools.ToolBox([lookup, tools.calculator])
    assert box.run("lookup", {"word": "cat", "limit": 1}).text == "cat: 1"
    assert box.run("lookup", {"word": "cat", "limit": " 2"}).text == "cat: 2"  # text for an integer: converted
    for name, args, said in [("nope", {}, "no tool named 'nope' (the tools are lookup, calculator)"),
                             ("lookup", {"limit": 1}, "lookup needs ['word']"),
                             ("lookup", {"word": "a", "colour": 1}, "not ['colour']"),
                             ("lookup", "cat", "takes the arguments ['word', 'limit'] by name"),
                             ("calculator", "1/0", "ZeroDivisionError"),
                             ("lookup", {"word": "a", "limit": "three"}, "lookup: expected an integer, got 'three'")]:
        result = box.run(name, args)
        assert result.error and said in result.text, result
    slow = tools.ToolBox([lambda seconds: time.sleep(seconds)])
    result = slow.run("<lambda>", {"seconds": 2}, deadline_s=0.1)
    assert result.timed_out and "took longer than 0.1 s" in result.text


@pytest.mark.parametrize("expression,value", [
    ("123*456", "56088"), ("(2+3)/4", "1.25"), ("-7/4", "-1.75"), ("1/3", "1/3"), ("0.1+0.2", "0.3"),
    ("2**100", str(2 ** 100)), ("7//2", "3"), ("-3%5", "2"), ("10/4*2", "5")])
def test_the_calculator_is_exact(expression, value):
    assert tools.calculator(expression) == value


@pytest.mark.parametrize("expression,said", [
    ("__import__('os').system('true')", "not arithmetic"), ("(1).__class__", "not arithmetic"),
    ("10**10**10", "more than 1000 digits"), ("2**0.5", "whole powers"), ("1/0", "division by zero"),
    ("x+1", "not arithmetic"), ("1+", "cannot parse")])
def test_the_calculator_evaluates_nothing_but_arithmetic(expression, said):
    with pytest.raises((ValueError, ZeroDivisionError), match=said):
        tools.calculator(expression)


# ---- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,turn,want", [
    ("plain", "I need <call>calculator(12*34)</call>", tool_formats.Call("calculator", "12*34")),
    ("plain", '<call>lookup({"word": "cat"})</call>', tool_formats.Call("lookup", {"word": "cat"})),
    ("plain", "The answer is 408.", None),
    ("plain", "<call>12*34</call>", "error: a call is <call>NAME(ARGUMENTS)</call>"),
    ("qwen", '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>',
     tool_formats.Call("calculator", {"expression": "2+2"})),
    ("qwen", '<tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}\n</tool_call>',
     tool_formats.Call("calculator", {"expression": "2"})),
    ("qwen", "<tool_call>\n{name: calculator}\n</tool_call>", "error: the tool call is not valid JSON"),
    ("qwen", "4", None),
    ("llama3", '<|python_tag|>{"name": "calculator", "parameters": {"expression": "1+1"}}<|eom_id|>',
     tool_formats.Call("calculator", {"expression": "1+1"})),
    ("mistral", '[TOOL_CALLS][{"name": "calculator", "arguments": {"expression": "3"}}]</s>',
     tool_formats.Call("calculator", {"expression": "3"})),
    ("mistral", '[TOOL_CALLS][{"arguments": {}}]</s>', 'error: a tool call is {"name": ...'),
])
def test_formats_parse_calls_and_say_what_is_malformed(name, turn, want):
    got = tool_formats.get(name).calls(turn)
    assert got == ([want] if want else []) if not isinstance(want, str) else got[0].startswith(want), got


def test_observations_follow_each_template():
    assert tool_formats.get("plain").observation(["408"]) == "<result>408</result>"
    assert tool_formats.get("qwen").observation(["408"]) == (
        "\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tool_formats.get("llama3").observation(["4"]).startswith("<|start_header_id|>ipython<|end_header_id|>\n\n4<|eot_id|>")
    assert tool_formats.get("mistral").observation(["4"]) == '[TOOL_RESULTS]{"content": "4"}[/TOOL_RESULTS]'
    with pytest.raises(ValueError, match="tools.format='hermes'"):
        tool_formats.get("hermes")


def test_qwen_observations_are_token_ids_of_the_template_with_its_special_tokens():
    tok = pretrained.qwen2_tokenizer()
    r = multi_turn.ToolRunner(tools.ToolBox([tools.calculator]), tool_formats.get("qwen"), tok)
    im_end, im_start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = r.observation(["408"], room=100)
    assert im_end in ids and ids.count(im_start) == 2 and tok.decode(ids) == tool_formats.get("qwen").observation(["408"])
    assert r.call_end == ()  # the model ends its turn (<|im_end|>) after its calls


# ---- the sampler ---------------------------------------------------------------------------------


def test_episodes_are_token_in_token_out_and_match_the_trainer(model, episodes):
    params, cfg = model
    rollout, stats, r = episodes
    assert stats.calls.sum() >= 2 and stats.errors.sum() >= 1 and stats.prefix_violations == 0
    tokens, sampled = np.asarray(rollout.tokens), np.asarray(rollout.sampled)
    lengths, logps = np.asarray(rollout.lengths), np.asarray(rollout.logprobs)
    result = r.observation(["42"], 100)
    assert result == TOK.encode("<result>42</result>", add_special_tokens=False)
    answered = np.flatnonzero((stats.calls > 0) & (stats.errors == 0) & (stats.observation_tokens > 0))
    assert len(answered) >= 2
    for i in answered:  # the observation follows the call, as ids, outside the loss
        row = list(tokens[i, :lengths[i]])
        start = next(s for s in range(len(row)) if row[s:s + len(result)] == result)
        assert TOK.decode(row[start - 1:start]) == ")"
        assert not sampled[i, start:start + len(result)].any() and (logps[i, start:start + len(result)] == 0).all()
        assert sampled[i, :start].all() and sampled[i, start + len(result):lengths[i]].all()
    assert sampled.sum() + stats.observation_tokens.sum() == lengths.sum()
    # The trainer's teacher-forced log-probabilities of the assembled sequences equal the sampler's.
    lp, _ = logprobs.completion_logprobs(params, cfg, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)
    assert np.abs(np.asarray(lp) - logps)[sampled].max() <= 1e-5
    # Prefill work: each prompt once (its G episodes share its cache) and each observation once; the
    # history is never run again.
    assert stats.prefill_tokens == np.asarray(rollout.prompt_mask)[::8].sum() + stats.observation_tokens.sum()


def test_episodes_without_a_call_are_the_single_turn_rollout(model, episodes):
    params, cfg = model
    rollout, stats, _ = episodes
    single = sampler.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1))
    plain = np.flatnonzero((stats.turns <= 1) & (stats.calls == 0) & (stats.errors == 0))
    assert len(plain) >= 4
    for i in plain:
        n = int(rollout.lengths[i])
        np.testing.assert_array_equal(np.asarray(rollout.tokens[i, :n]), np.asarray(single.tokens[i, :n]))
        np.testing.assert_allclose(np.asarray(rollout.logprobs[i, :n]), np.asarray(single.logprobs[i, :n]), atol=1e-6)


def test_episodes_do_not_depend_on_the_tools_timing(model, episodes):
    """A row resumes at the host's first return after its pause, whenever its call finishes."""
    params, cfg = model
    rng = np.random.default_rng(0)

    def calculator(expression: str) -> str:
        time.sleep(float(rng.uniform(0, 0.05)))
        return tools.calculator(expression)

    again, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1),
                                     runner(box=tools.ToolBox([calculator])))
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(episodes[0].tokens))
    np.testing.assert_array_equal(np.asarray(again.sampled), np.asarray(episodes[0].sampled))


def test_calls_run_while_other_rows_decode(model):
    """A sleeping tool: several rows' calls overlap each other, and decode steps run while they do."""
    params, cfg = model
    running, overlapped, spans = [], [], []

    def calculator(expression: str) -> str:
        start = time.perf_counter()
        running.append(1)
        overlapped.append(len(running) > 1)
        time.sleep(0.2)
        running.pop()
        spans.append((start, time.perf_counter()))
        return tools.calculator(expression)

    r = runner(box=tools.ToolBox([calculator], workers=8))
    rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r)
    assert stats.calls.sum() >= 2 and any(overlapped)  # calls of rows parked together run together
    assert stats.prefix_violations == 0
    # (The wall time against decode + tools: benchmarks/bench_multi_turn.py.)


def test_budgets_end_episodes_and_cut_long_observations(model):
    params, cfg = model
    # One turn: a call ends the episode (truncated), with nothing fed.
    rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), runner(max_turns=1))
    assert stats.observation_tokens.sum() == 0 and (stats.turns <= 1).all()
    lengths = np.asarray(rollout.lengths)
    answered = np.asarray(rollout.tokens)[np.arange(len(lengths)), lengths - 1] == 2  # ended with EOS
    assert (stats.truncated == ~answered).all() and (np.asarray(rollout.truncated) == stats.truncated).all()
    assert ((stats.turns == 1) & ~answered).sum() >= 2  # calls the budget ended
    # A long result is cut in the middle, saying so, to max_observation_tokens.
    r = runner(max_observation_tokens=40)
    ids = r.observation(["x" * 100 + "END"], room=1000)
    text = TOK.decode(ids, skip_special_tokens=False)
    assert text.startswith("<result>xxx") and text.endswith("END</result>") and "tokens cut ...]" in text
    assert len(ids) == len(r.opens) + 40 + len(r.closes)
    assert r.observation(["x" * 100], room=len(r.opens) + len(r.closes) - 1) is None  # no room: the episode ends


def test_a_malformed_call_is_an_observation_not_a_crash(model, episodes):
    rollout, stats, _ = episodes
    i = int(np.flatnonzero(stats.errors)[0])
    text = TOK.decode(np.asarray(rollout.tokens[i, :int(rollout.lengths[i])]), skip_special_tokens=False)
    assert "<result>error: o" in text  # "error: odd", cut to the 8-token budget


# ---- the loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_observation_tokens_enter_no_loss_term_or_normaliser(model, episodes, aggregation):
    """Against an independent GRPO loss over the sampled tokens only, padded and packed."""
    params, cfg = model
    rollout, stats, _ = episodes
    n, C = 16, SAMPLING.max_new_tokens
    batch = {"prompt_ids": rollout.prompt_ids[:n], "prompt_mask": rollout.prompt_mask[:n],
             "completion_ids": rollout.tokens[:n], "completion_mask": rollout.mask[:n],
             "sampled_mask": rollout.sampled[:n], "advantages": jnp.linspace(-0.5, 1.5, n)}
    assert 0 < np.asarray(batch["sampled_mask"] < batch["completion_mask"]).sum()  # observations in the batch
    loss_cfg = loss.LossConfig(aggregation=aggregation, beta=0.0)

    def reference(p):
        lp, _ = logprobs.completion_logprobs(p, cfg, batch["prompt_ids"], batch["prompt_mask"],
                                             batch["completion_ids"], batch["completion_mask"])
        s = batch["sampled_mask"].astype(jnp.float32)
        per_token = batch["advantages"][:, None] * jnp.exp(lp - jax.lax.stop_gradient(lp)) * s
        if aggregation == "token-mean":
            return -per_token.sum() / s.sum()
        return -(per_token.sum(axis=1) / s.sum(axis=1)).mean()

    want, want_grad = jax.value_and_grad(reference)(params)
    got, grad, m = objective.loss_and_grad(params, batch, cfg, loss_cfg)
    assert got == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad, want_grad)
    assert float(m["completion_length"]) == pytest.approx(float(batch["sampled_mask"].sum()) / n)
    _, ignored, _ = objective.loss_and_grad(params, {k: v for k, v in batch.items() if k != "sampled_mask"}, cfg, loss_cfg)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ignored), jax.tree.leaves(want_grad)))
    assert diff > 1e-3 * max(float(jnp.abs(b).max()) for b in jax.tree.leaves(want_grad))  # the mask matters here

    host = {k: np.asarray(v) for k, v in batch.items()}
    packed, _ = packing.from_padded(host, 8)
    p_loss, p_grad, _ = objective.loss_and_grad(params, packed, cfg, loss_cfg)
    assert float(p_loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p_grad, want_grad)


def test_tool_threads_are_the_toolbox_s():
    box = tools.ToolBox([lambda: threading.current_thread().name], workers=2)
    assert box.run("<lambda>", {}).text.startswith("grpo_jax-tool")


# ---- training ------------------------------------------------------------------------------------

tool_formats.FORMATS["every_paren"] = EveryParen()


def used_the_tool(prompts, completions, **columns):
    """1 for an episode that read the calculator's 42, else 0."""
    return [float("<result>42</result>" in c) for c in completions]


def _tool_config(workdir, steps):
    from test_trainer import tiny_config

    c = tiny_config(workdir, steps=steps)
    c.sampling.max_new_tokens = 24
    c.tools.names, c.tools.format, c.tools.max_observation_tokens = ("calculator",), "every_paren", 8
    c.rewards = {"test_multi_turn:used_the_tool": 1.0}
    c.eval.every, c.optimizer.warmup_steps = 0, 0
    return c


def test_grpo_trains_on_episodes_and_resumes_them_bit_exactly(tmp_path):
    from grpo_jax.run import trainer

    with trainer.Trainer(_tool_config(tmp_path / "full", 4)) as full:
        before = jax.device_get(full.params)
        h_full = full.run()["history"]
        p_full = jax.device_get(full.params)
    last = h_full[-1]
    assert sum(h["tools/calculator/calls"] for h in h_full) > 0 and all(h["tools/prefix_violations"] == 0 for h in h_full)
    assert max(h["mismatch/logp_abs_diff_mean"] for h in h_full) < 1e-5  # sampler and trainer agree, float32
    assert {"tools/turns_mean", "tools/observation_tokens_mean", "tools/errors", "tools/seconds"} <= set(last)
    assert any(h["reward"] > 0 for h in h_full)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(before)))

    with trainer.Trainer(_tool_config(tmp_path / "part", 4)) as part:
        part.run(until=2)
    cfg = _tool_config(tmp_path / "part", 4)
    cfg.resume = True
    with trainer.Trainer(cfg) as resumed:
        h_res = resumed.run()["history"]
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), p_full)
    for a, b in zip(h_res, h_full[2:]):
        assert a["loss"] == b["loss"] and a["reward"] == b["reward"] and a["tools/calls_mean"] == b["tools/calls_mean"]


def test_tool_settings_are_checked_before_any_work():
    from grpo_jax.run import config

    c = _tool_config("/tmp/unused", 1)
    for field, value, said in [("format", "hermes", "tools.format='hermes'"), ("max_turns", 0, "tools.max_turns=0"),
                               ("names", ("calculatr",), "tools.names: 'calculatr'")]:
        bad = _tool_config("/tmp/unused", 1)
        setattr(bad.tools, field, value)
        with pytest.raises(config.ConfigError, match=said):
            config.check(bad)
    config.check_mesh(c, 2, 2)  # several hosts: each runs its own rows' calls (tests/parallel/test_multihost.py)


# The module's rollout on an 8-device (2, 4, 1) mesh, in the session's 8-device worker: it prints the
# rollout's arrays as JSON after its lines.
MESH_PROGRAM = """
import json, jax, numpy as np
from grpo_jax.parallel import partitioning
from test_multi_turn import PROMPTS, SAMPLING, runner, architecture, transformer, multi_turn, TOK
assert jax.device_count() == 8, jax.devices()
cfg = architecture.SHAPES["tiny"].replace(vocab_size=TOK.vocab_size)
params = transformer.init_params(cfg, jax.random.key(0))
mesh = partitioning.make_mesh(data=2, fsdp=4)
rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), runner(), mesh=mesh)
out = {k: np.asarray(getattr(rollout, k)).tolist() for k in ("tokens", "sampled", "lengths", "truncated", "logprobs")}
out["calls"] = stats.calls.tolist()
print("RESULT", json.dumps(out))
"""


def test_episodes_on_a_2x4_mesh_equal_one_device(episodes, simulated_devices):
    import json

    rollout, stats, _ = episodes
    got = json.loads(simulated_devices(MESH_PROGRAM, name="multi-turn mesh").split("RESULT", 1)[1])
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(rollout.tokens))
    np.testing.assert_array_equal(np.asarray(got["sampled"]), np.asarray(rollout.sampled))
    np.testing.assert_array_equal(np.asarray(got["lengths"]), np.asarray(rollout.lengths))
    np.testing.assert_array_equal(np.asarray(got["calls"]), stats.calls)
    np.testing.assert_allclose(np.asarray(got["logprobs"]), np.asarray(rollout.logprobs), atol=1e-5)


def test_tool_demonstrations_train_on_the_model_s_tokens_only(model):
    """SFT on a written episode: its observation is tokenised as the sampler feeds it and is context."""
    from grpo_jax.rl import sft

    params, cfg = model
    fmt = tool_formats.get("plain")
    texts = ["<call>calculator(12*34)</call><result>408</result>#### 408", "#### 7"]
    assert fmt.split(texts[0]) == [("<call>calculator(12*34)</call>", None), ("<result>408</result>", ["408"]),
                                   ("#### 408", None)]
    ids, cut, targets = sft.encode_episodes(TOK, texts, TOK.eos_token_id, 64, fmt)
    obs = multi_turn.ToolRunner(tools.ToolBox([tools.calculator]), fmt, TOK).observation(["408"], room=100)
    start = len(TOK.encode("<call>calculator(12*34)</call>", add_special_tokens=False))
    assert ids[0][start:start + len(obs)] == obs and cut == 0 and ids[0][-1] == TOK.eos_token_id
    assert targets[0] == [True] * start + [False] * len(obs) + [True] * (len(ids[0]) - start - len(obs))
    assert all(targets[1])
    batch = sft.make_batch([TOK.encode("What is 12 * 34?")] * 2, ids, 0, (32,), (64,), targets=targets)
    lp, _ = logprobs.completion_logprobs(params, cfg, batch["prompt_ids"], batch["prompt_mask"],
                                         batch["completion_ids"], batch["completion_mask"])
    want = -(np.asarray(lp) * batch["sampled_mask"]).sum()
    assert float(sft.sft_loss_terms(params, cfg, batch)) == pytest.approx(float(want), rel=1e-6)
    assert batch["sampled_mask"].sum() == sum(map(sum, targets)) < batch["completion_mask"].sum()


def test_calls_waiting_on_a_full_pool_never_starve_their_tools():
    box = tools.ToolBox([tools.calculator], workers=1)
    calls = [box.submit("calculator", "6*7", deadline_s=5.0) for _ in range(4)]
    assert [c.result(timeout=10).text for c in calls] == ["42"] * 4
