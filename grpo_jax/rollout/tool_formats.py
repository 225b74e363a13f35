"""How a model writes tool calls and reads their results: the formats of the families grpo_jax loads.

A format gives the sampler (grpo_jax.rollout.multi_turn):
  call_end     the text that closes a call: the sampler parks the row there. "" parks it at the end
               of its turn only (EOS), for formats that put several calls in one turn;
  calls(turn)  the calls in a turn's text, in order (a Call, or an error message for a malformed one
               that the model reads as its result); [] for a turn without one (a final answer);
  opens, between, closes   the template's text around the results of one turn's calls: the
               observation is opens + result_1 + between + result_2 ... + closes, up to where the
               model writes again. Each piece is tokenised on its own and appended as token ids
               (`observation_ids`): the history is never re-rendered or re-tokenised.

    plain    <call>calculator(12*34)</call><result>408</result>      (one call per turn; models
             without a tool template: the character model, SmolLM2, Gemma 3; the argument as one
             string or a JSON object)
    qwen     <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> (one or more), then
             <|im_end|>; the results in one user turn, each in <tool_response>; Qwen2.5, Qwen3 (hermes)
    llama3   <|python_tag|>{"name": ..., "parameters": {...}}<|eom_id|> (one call per turn); the
             result in an ipython turn
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]</s>; each result in [TOOL_RESULTS]
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    arguments: dict | str


def _json_calls(text: str, args_key: str) -> list[Call | str]:
    """A JSON call object, or a list of them, as Calls (an error message for each malformed one)."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        return [f"error: the tool call is not valid JSON ({e.msg} at character {e.pos})"]
    out = []
    for item in obj if isinstance(obj, list) else [obj]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            out.append('error: a tool call is {"name": ..., "' + args_key + '": {...}}')
            continue
        args = item.get(args_key, item.get("arguments", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append(Call(item["name"], args) if isinstance(args, (dict, str))
                   else f"error: the {args_key} of a tool call are an object of named values")
    return out or ['error: a tool call is {"name": ..., "' + args_key + '": {...}}']


class Format:
    name = ""
    call_end = ""
    opens = between = closes = ""

    def calls(self, turn: str) -> list[Call | str]:
        raise NotImplementedError

    def escape(self, result: str) -> str:
        """A result as the template writes it between `opens` and `closes` (Mistral: a JSON string)."""
        return result

    def unescape(self, text: str) -> str:
        return text

    def observation(self, results: Sequence[str]) -> str:
        return self.opens + self.between.join(map(self.escape, results)) + self.closes

    def observation_ids(self, encode: Callable[[str], list[int]], results: Sequence[Sequence[int]]) -> list[int]:
        """The observation as token ids, each piece tokenised on its own: the boundaries, and the
        results already tokenised (and cut) by the caller. The sampler feeds exactly these ids, and
        SFT on a demonstration (grpo_jax.rl.sft.encode_episodes) trains on the same."""
        ids = encode(self.opens)
        for i, r in enumerate(results):
            ids += (encode(self.between) if i else []) + list(r)
        return ids + encode(self.closes)

    def split(self, text: str) -> list[tuple[str, list[str] | None]]:
        """A written episode (a demonstration) as pieces: (text, None) for the model's, and
        (observation text, its results) for each observation."""
        pattern = re.escape(self.opens) + "(.*?)" + re.escape(self.closes)
        if self.between.startswith(self.closes):  # (plain, mistral) the observation goes on after a `between`
            pattern += "(?!" + re.escape(self.between[len(self.closes):]) + ")"
        pieces, at = [], 0
        for m in re.finditer(pattern, text, re.S):
            results = [self.unescape(r) for r in (m.group(1).split(self.between) if self.between else [m.group(1)])]
            pieces += [(text[at:m.start()], None), (m.group(0), results)]
            at = m.end()
        return [p for p in pieces + [(text[at:], None)] if p[0]]

    def describe(self, schemas: list[dict]) -> str:
        """The tools in words, for prompts whose template cannot show them (plain text)."""
        lines = []
        for s in schemas:
            f = s["function"]
            args = ", ".join(f["parameters"]["properties"])
            lines.append(f"{f['name']}({args}): {f['description']}")
        return "Tools:\n" + "\n".join(lines)


class Plain(Format):
    name, call_end = "plain", "</call>"
    opens, between, closes = "<result>", "</result><result>", "</result>"
    _CALL = re.compile(r"<call>(.*?)</call>", re.S)
    _SIGNATURE = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\((.*)\)\s*", re.S)
    _MALFORMED = "error: a call is <call>NAME(ARGUMENTS)</call>"

    def calls(self, turn: str) -> list[Call | str]:
        found = self._CALL.findall(turn)
        if not found:
            return [] if "<call>" not in turn else [self._MALFORMED]
        m = self._SIGNATURE.fullmatch(found[-1])  # the row parks at the first </call>: one call
        if m is None:
            return [self._MALFORMED]
        args = m.group(2).strip()
        if args.startswith("{"):
            try:
                parsed = json.loads(args)
            except ValueError as e:
                return [f"error: the arguments are not valid JSON ({e.msg})"]
            return [Call(m.group(1), parsed) if isinstance(parsed, dict) else "error: arguments are one value or {...}"]
        return [Call(m.group(1), args)]

    def describe(self, schemas: list[dict]) -> str:
        return super().describe(schemas) + "\nCall a tool as <call>NAME(ARGUMENT)</call>; its result follows as <result>...</result>."


class Qwen(Format):
    """Qwen2.5 / Qwen3 (hermes): the calls in the assistant turn, which the model ends (<|im_end|>);
    the results in one user turn, one <tool_response> each, as the chat template renders them."""

    name, call_end = "qwen", ""
    opens = "\n<|im_start|>user\n<tool_response>\n"
    between = "\n</tool_response>\n<tool_response>\n"
    closes = "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    def calls(self, turn: str) -> list[Call | str]:
        found = self._CALL.findall(turn)
        if not found:
            return [] if "<tool_call>" not in turn else ["error: a tool call ends with </tool_call>"]
        return [c for body in found for c in _json_calls(body.strip(), "arguments")]


class Llama3(Format):
    """Llama 3.1+: a call after <|python_tag|> ends with <|eom_id|>; the result in an ipython turn."""

    name, call_end = "llama3", "<|eom_id|>"
    opens = "<|start_header_id|>ipython<|end_header_id|>\n\n"
    between = "<|eot_id|>" + opens
    closes = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

    def calls(self, turn: str) -> list[Call | str]:
        if "<|python_tag|>" not in turn:
            return []
        body = turn.split("<|python_tag|>")[-1].replace("<|eom_id|>", "").replace("<|eot_id|>", "").strip()
        return _json_calls(body, "parameters")[:1]


class Mistral(Format):
    """Mistral: [TOOL_CALLS] and a JSON list of calls, ending the turn (EOS); each result in
    [TOOL_RESULTS] as a JSON object."""

    name, call_end = "mistral", ""
    opens, between, closes = '[TOOL_RESULTS]{"content": "', '"}[/TOOL_RESULTS][TOOL_RESULTS]{"content": "', '"}[/TOOL_RESULTS]'

    def calls(self, turn: str) -> list[Call | str]:
        if "[TOOL_CALLS]" not in turn:
            return []
        return _json_calls(turn.split("[TOOL_CALLS]")[-1].replace("</s>", "").strip(), "arguments")

    def escape(self, result: str) -> str:
        return json.dumps(result, ensure_ascii=False)[1:-1]  # as the template's tojson writes it

    def unescape(self, text: str) -> str:
        return json.loads(f'"{text}"')


FORMATS = {f.name: f for f in (Plain(), Qwen(), Llama3(), Mistral())}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"tools.format={name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]
