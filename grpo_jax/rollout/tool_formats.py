"""How a model writes a tool call and reads its result: the formats of the families grpo_jax loads.

A format gives the sampler three things (grpo_jax.rollout.multi_turn):
  call_end     the text that closes a call: the sampler parks the row there (a turn that ends
               with EOS is parked too, so formats whose calls end the turn work as well);
  parse(turn)  the call in a turn's text (a Call), None for a turn without one (a final answer),
               or an error message for a malformed call (the model reads it as the observation);
  observation(text)  the text that follows the call: the template's boundary tokens around the
               tool's result, up to where the model writes again. It is tokenised on its own and
               appended as token ids: the history is never re-rendered or re-tokenised.

    plain    <call>calculator(12*34)</call><result>408</result>      (models without a tool
             template: the character model, SmolLM2, Gemma 3; arguments as one string or a JSON object)
    qwen     <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, the result in a user turn
             as <tool_response>; Qwen2.5 and Qwen3 (hermes)
    llama3   <|python_tag|>{"name": ..., "parameters": {...}}<|eom_id|>, the result in an ipython turn
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}]</s>, the result in [TOOL_RESULTS]
"""

from __future__ import annotations

import dataclasses
import json
import re


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    arguments: dict | str


def _json_call(text: str, args_key: str) -> Call | str:
    try:
        obj = json.loads(text)
    except ValueError as e:
        return f"error: the tool call is not valid JSON ({e.msg} at character {e.pos})"
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return 'error: a tool call is {"name": ..., "' + args_key + '": {...}}'
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if not isinstance(args, (dict, str)):
        return f"error: the {args_key} of a tool call are an object of named values"
    return Call(obj["name"], args)


class Format:
    name = ""
    call_end = ""

    def parse(self, turn: str) -> Call | str | None:
        raise NotImplementedError

    def observation(self, result: str) -> str:
        raise NotImplementedError

    def split(self, text: str) -> list[tuple[str, bool]]:
        """A written episode (a demonstration) as (text, is_observation) pieces: each observation is
        the format's boundary text around a result. Tokenised piece by piece, as the sampler feeds
        them, an SFT example trains on exactly the ids a rollout would hold."""
        before, _, after = self.observation("\x00").partition("\x00")
        pieces, at = [], 0
        for m in re.finditer(re.escape(before) + "(.*?)" + re.escape(after), text, re.S):
            pieces += [(text[at:m.start()], False), (m.group(0), True)]
            at = m.end()
        return [p for p in pieces + [(text[at:], False)] if p[0]]

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
    _CALL = re.compile(r"<call>(.*?)</call>", re.S)
    _SIGNATURE = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\((.*)\)\s*", re.S)

    def parse(self, turn: str) -> Call | str | None:
        calls = self._CALL.findall(turn)
        if not calls:
            return None if "<call>" not in turn else "error: a call is <call>NAME(ARGUMENTS)</call>"
        m = self._SIGNATURE.fullmatch(calls[-1])
        if m is None:
            return "error: a call is <call>NAME(ARGUMENTS)</call>"
        args = m.group(2).strip()
        if args.startswith("{"):
            try:
                parsed = json.loads(args)
            except ValueError as e:
                return f"error: the arguments are not valid JSON ({e.msg})"
            return Call(m.group(1), parsed) if isinstance(parsed, dict) else "error: arguments are one value or {...}"
        return Call(m.group(1), args)

    def observation(self, result: str) -> str:
        return f"<result>{result}</result>"

    def describe(self, schemas: list[dict]) -> str:
        return super().describe(schemas) + "\nCall a tool as <call>NAME(ARGUMENT)</call>; its result follows as <result>...</result>."


class Qwen(Format):
    """Qwen2.5 / Qwen3 (hermes): the calls in the assistant turn, the results in a user turn."""

    name, call_end = "qwen", "</tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    def parse(self, turn: str) -> Call | str | None:
        calls = self._CALL.findall(turn)
        if not calls:
            return None if "<tool_call>" not in turn else "error: a tool call ends with </tool_call>"
        return _json_call(calls[-1].strip(), "arguments")

    def observation(self, result: str) -> str:
        return ("<|im_end|>\n<|im_start|>user\n<tool_response>\n" + result
                + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


class Llama3(Format):
    """Llama 3.1+: a call after <|python_tag|> ends with <|eom_id|>; the result in an ipython turn."""

    name, call_end = "llama3", "<|eom_id|>"

    def parse(self, turn: str) -> Call | str | None:
        if "<|python_tag|>" not in turn:
            return None
        body = turn.split("<|python_tag|>")[-1].replace("<|eom_id|>", "").replace("<|eot_id|>", "").strip()
        return _json_call(body, "parameters")

    def observation(self, result: str) -> str:
        return ("<|start_header_id|>ipython<|end_header_id|>\n\n" + result
                + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


class Mistral(Format):
    """Mistral: [TOOL_CALLS] and a JSON list, ending the turn (EOS); the result in [TOOL_RESULTS]."""

    name, call_end = "mistral", ""  # the call ends the turn: the row is parked at its EOS

    def parse(self, turn: str) -> Call | str | None:
        if "[TOOL_CALLS]" not in turn:
            return None
        body = turn.split("[TOOL_CALLS]")[-1].replace("</s>", "").strip()
        return _json_call(body, "arguments")

    def observation(self, result: str) -> str:
        return "[TOOL_RESULTS]" + json.dumps({"content": result}) + "[/TOOL_RESULTS]"


FORMATS = {f.name: f for f in (Plain(), Qwen(), Llama3(), Mistral())}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"tools.format={name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]
