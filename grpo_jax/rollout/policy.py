"""The policy: a language model to sample from, with no training state.

    pol, source = loading.load(cfg)                     # weights of cfg.model, or of cfg.init_from's run
    pol, source = loading.load(cfg, workdir="runs/x")   # a run's checkpoint: its parameters only
    gen = pol.sample(rows, n=4, key=key)               # texts, lengths, truncated, mean log-prob
    rollout = pol.rollout(rows, n=8, key=key)          # device arrays for a training step
    pol.export_hf("exports/x")                         # transformers / vLLM folder

A Policy holds parameters (placed on the mesh), the model config, the tokenizer, the mesh, how a
dataset row becomes a prompt, and how to sample. Evaluation (grpo_jax.rollout.evaluation), export, test-time
scaling and rejection sampling use it on its own: loading one never builds optimizer state, and a
checkpoint's parameters are restored straight onto their devices without a random init first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from grpo_jax.models import architecture
from grpo_jax.models import hf
from grpo_jax.models import lora
from grpo_jax.models import tokenizer
from grpo_jax.parallel import multihost
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats


R1_SYSTEM = ("A conversation between User and Assistant. The Assistant first thinks about the reasoning "
             "process and then gives the answer, enclosed in <think> </think> and <answer> </answer> tags.")


TEMPLATES = ("plain", "chat", "r1", "tokens")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a dataset row becomes prompt tokens: the row's `field` (then `instruction`, if any) as
    `plain` text, in the tokenizer's `chat` template, or `r1` (DeepSeek-R1's system prompt, then
    chat); `tokens` takes the field as token ids already.

    With tools (multi-turn rollouts), their schemas go where the template shows tools (a chat
    template that takes `tools`), else into the text as the tool format describes them."""

    template: str = "plain"
    field: str = "question"
    instruction: str = ""
    # Qwen3's chat template: False appends an empty <think></think> (answer without reasoning);
    # None leaves the template's default.
    enable_thinking: bool | None = None
    tools: tuple[dict, ...] = ()  # the tools' JSON schemas (grpo_jax.rollout.tools.ToolBox.schemas)
    tool_format: str = "plain"  # grpo_jax.rollout.tool_formats

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template={self.template!r}; expected one of {list(TEMPLATES)}")

    def ids(self, row: dict, tokenizer) -> list[int]:
        if self.template == "tokens":
            return [int(t) for t in row[self.field]]
        text = str(row[self.field]) + (f" {self.instruction}" if self.instruction else "")
        shown = bool(self.tools) and self.template != "plain" and "tools" in str(getattr(tokenizer, "chat_template", ""))
        if self.tools and not shown:
            text = tool_formats.get(self.tool_format).describe(list(self.tools)) + "\n" + text
        if self.template == "plain":
            return tokenizer.encode(text)
        messages = [{"role": "user", "content": text}]
        if self.template == "r1":
            messages = [{"role": "system", "content": R1_SYSTEM}] + messages
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        if shown:
            extra["tools"] = list(self.tools)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclasses.dataclass
class Completions:
    """Sampled completions of a list of problems, the n of each problem adjacent ([rows * n])."""

    texts: list[str]
    lengths: np.ndarray  # [rows * n] tokens, EOS included
    truncated: np.ndarray  # [rows * n] bool: no EOS within the token limit
    mean_logp: np.ndarray  # [rows * n] mean token log-probability under the sampling distribution
    # Multi-turn: the episodes' calls and environment states, as reward-function columns [rows * n].
    columns: dict[str, list] | None = None


# One jitted merge for every rollout (compiled once per config, not re-wrapped per step).
_merged = jax.jit(lora.merged, static_argnums=1)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameters on a mesh with what it takes to prompt and sample them."""

    params: architecture.Params
    model_cfg: architecture.ModelConfig
    tokenizer: Any
    mesh: Mesh
    prompt: PromptFormat
    sampling: sampler.SamplingConfig
    # "inference": sample from a copy in the compute dtype split over tensor only (sampler.
    # inference_params), made once per rollout; "training": from the weights as they are stored
    # (for a model whose tensor shard does not fit on a device beside the KV cache).
    sampling_weights: str = "inference"
    # LoRA: sample with the adapters folded into the rollout copy (W + A B s, rounded to the compute
    # dtype) instead of applying them at every projection: faster decode steps, but the sampler's
    # log-probabilities then differ from the trainer's (which applies them unmerged) in bf16.
    merge_lora: bool = False
    is_inference_copy: bool = False
    # Multi-turn rollouts with tools (None: single-turn). It keeps the last rollout's stats (`last`).
    tools: multi_turn.ToolRunner | None = None

    def __post_init__(self):
        if self.sampling_weights not in ("inference", "training"):
            raise ValueError(f"sampling.weights={self.sampling_weights!r}; expected 'inference' or 'training'")

    def replace(self, **fields) -> Policy:
        return dataclasses.replace(self, **fields)

    def for_sampling(self) -> Policy:
        """This policy with the weights sampling reads (see `sampling_weights`); free it after use."""
        if self.is_inference_copy:
            return self
        params, model_cfg = self.params, self.model_cfg
        if model_cfg.lora_rank and self.merge_lora:
            params, model_cfg = _merged(params, model_cfg), lora.base_config(model_cfg)
        if self.sampling_weights == "training":
            return self.replace(params=params, model_cfg=model_cfg)  # merged again: a no-op (no adapters left)
        params, model_cfg = sampler.inference_params(params, model_cfg, self.mesh)
        return self.replace(params=params, model_cfg=model_cfg, is_inference_copy=True)

    def prompt_ids(self, rows: Sequence[dict]) -> list[list[int]]:
        return [self.prompt.ids(r, self.tokenizer) for r in rows]

    def too_long(self, rows: Sequence[dict]) -> list[int]:
        """Indices of the rows whose prompt is longer than the largest prompt bucket (they cannot be
        sampled). Exact, but only rows that might be too long are tokenised: a prompt has at most one
        token per UTF-8 byte of its text plus the template's own tokens (byte-level BPE, SentencePiece
        with byte fallback, characters), so most datasets are measured without tokenising."""
        limit, field = max(self.sampling.prompt_buckets), self.prompt.field
        if self.prompt.template == "tokens":
            return [i for i, r in enumerate(rows) if len(r[field]) > limit]
        overhead = len(self.prompt.ids({field: ""}, self.tokenizer)) + 2  # + a leading-space token or two
        return [i for i, r in enumerate(rows) if len(str(r[field]).encode()) + overhead > limit
                and len(self.prompt.ids(r, self.tokenizer)) > limit]

    def rollout(self, rows: Sequence[dict], n: int, key: jax.Array,
                sampling: sampler.SamplingConfig | None = None) -> sampler.Rollout:
        """n completions of each of this host's rows (all hosts' rows in the returned arrays)."""
        pol = self.for_sampling()
        gather = self.sampling_weights == "inference"
        if self.tools is not None:
            rollout, self.tools.last = multi_turn.sample(pol.params, pol.model_cfg, self.prompt_ids(rows), n,
                                                         sampling or self.sampling, key, self.tools, mesh=self.mesh,
                                                         gather_weights=gather, rows=rows)
            return rollout
        return sampler.sample(pol.params, pol.model_cfg, self.prompt_ids(rows), n, sampling or self.sampling,
                              key, mesh=self.mesh, gather_weights=gather)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Completion texts of token rows [N, T] cut at their lengths (special tokens dropped)."""
        return [self.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(len(tokens))]

    def sample(self, rows: Sequence[dict], n: int, key: jax.Array, sampling: sampler.SamplingConfig | None = None,
               batch_size: int | None = None) -> Completions:
        """n completions of each of this host's `rows`, `batch_size` rows per sampler call (on several
        hosts every host calls this with its own block of rows, in step)."""
        batch = batch_size or len(rows)
        pol = self.for_sampling()  # one copy for all batches
        texts, lengths, truncated, mean_logp, columns = [], [], [], [], {}
        for start in range(0, len(rows), batch):
            r = pol.rollout(rows[start:start + batch], n, jax.random.fold_in(key, start), sampling)
            for k, v in (self.tools.last.columns() if self.tools is not None else {}).items():
                columns.setdefault(k, []).extend(v)
            toks, lens = multihost.local_rows(r.tokens), multihost.local_rows(r.lengths)
            logp = multihost.local_rows(r.logprobs)
            mask = multihost.local_rows(r.mask if r.sampled is None else r.sampled)  # the policy's own tokens
            texts += self.decode(toks, lens)
            lengths.append(lens)
            truncated.append(multihost.local_rows(r.truncated))
            mean_logp.append((logp * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
        return Completions(texts, np.concatenate(lengths), np.concatenate(truncated), np.concatenate(mean_logp),
                           columns or None)

    def export_hf(self, path: str, dtype: str | None = None) -> str:
        """A Hugging Face folder (weights, config, tokenizer) for transformers and vLLM; the char
        tokenizer is written as an equivalent `PreTrainedTokenizerFast`. LoRA adapters are merged
        into the kernels (in the base's dtype unless `dtype`)."""
        tok = self.tokenizer.to_hf() if isinstance(self.tokenizer, tokenizer.CharTokenizer) else self.tokenizer
        params, cfg = self.params, self.model_cfg
        if cfg.lora_rank:
            params, cfg = lora.merged(params, cfg), lora.base_config(cfg)
        return str(hf.save_hf(jax.device_get(params), cfg, path, dtype=dtype, tokenizer=tok))

    def export_peft(self, path: str, base_model: str = "") -> str:
        """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) of a LoRA policy, for
        `peft.PeftModel.from_pretrained` on the transformers model of its base (`base_model`)."""
        if not self.model_cfg.lora_rank:
            raise ValueError("export_peft: this policy has no LoRA adapters (model.lora.rank=0); use export_hf")
        return str(lora.save_peft(path, jax.device_get(self.params), self.model_cfg, base_model))
