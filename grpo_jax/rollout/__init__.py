"""Sampling from a model: the KV-cached decode loop (sampler), the Policy that turns dataset rows
into prompts and completions, held-out evaluation, and pass@k / maj@k (at_k)."""
