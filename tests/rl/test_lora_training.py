"""LoRA runs: only the adapters train, the frozen base is held once and is the KL reference, resume is
bit for bit, checkpoints hold the adapters and refuse another base, exports load in peft."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from grpo_jax.models import hf
from grpo_jax.models import lora
from grpo_jax.models import transformer
from grpo_jax.rl import grpo
from grpo_jax.run import loading
from grpo_jax.run import pipeline
from grpo_jax.run import trainer
from test_trainer import tiny_config  # noqa: E402

RANK = 4


def varied(prompts, completions, **columns):
    """A reward that differs within most groups (so that there is signal)."""
    return [sum(map(ord, t)) % 7 / 7 for t in completions]


def lora_config(workdir, steps=4, **lora_fields):
    cfg = tiny_config(workdir, steps)
    cfg.model.lora.update({"rank": RANK, "alpha": 8.0, **lora_fields})
    cfg.rewards = {"varied": 1.0}
    cfg.grpo.beta = 0.04
    cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 3e-2, 0
    cfg.eval.every = 0
    return cfg


def size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def run(cfg, until=None, record=None):
    tr = trainer.Trainer(cfg, reward_fns={"varied": varied})
    if record is not None:  # every update's batch
        fn = tr.algorithm.update_fn
        tr.algorithm.update_fn = lambda state, batch: (record.append(jax.device_get(batch)), fn(state, batch))[1]
    try:
        history = tr.run(until=until)["history"]
        return tr, history
    finally:
        tr.close()


def test_lora_trains_only_the_adapters_on_one_base_that_is_the_reference(tmp_path):
    base_cfg = lora_config(tmp_path / "plain")
    base_cfg.model.lora.rank = 0
    base, _ = loading.load(base_cfg)  # the model the LoRA run adapts: the same seeded shape
    batches = []
    tr, history = run(lora_config(tmp_path / "run"), record=batches)
    state = tr.state

    # The base is held once (no reference copy); the optimizer state covers the adapters only.
    assert state.ref_params is None
    frozen, adapters = state.frozen, state.params
    assert size(frozen) == size(base.params) and size(adapters) == size(lora.split(tr.params)[1])
    assert size((state.params, state.frozen, state.ref_params)) == size(tr.params)
    assert size(state.opt_state) < 2 * size(adapters) + 100 < size(frozen)
    assert all(k.endswith("_lora") for layer in adapters["layers"].values() for k in layer)

    # Only the adapters changed: the base is the loaded model bit for bit; every B moved off zero.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), jax.device_get(base.params))
    for layer in jax.device_get(adapters)["layers"].values():
        for ab in layer.values():
            assert np.abs(ab["b"]).max() > 0

    # The reference log-probabilities are the base model's (as a full fine-tune's reference pass
    # computes them from its copy), and the first step's policy is the base (B = 0): its KL is
    # exactly 0; later steps move away from it.
    b = batches[0]
    seqs = {k: v for k, v in b.items() if k not in ("advantages", "ref_logp", "old_logp", "sampler_logp", "truncated",
                                                    "completion_valid")}  # the sequences, padded or packed
    ref = jax.jit(functools.partial(grpo.batch_logprobs, model_cfg=base.model_cfg, loss_cfg=tr.algorithm.loss_cfg,
                                    mesh=base.mesh, num_microbatches=1))(base.params, seqs)
    mask = b["completion_mask"]
    np.testing.assert_array_equal(np.where(mask, b["ref_logp"], 0), np.where(mask, ref, 0))
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0
    assert min(h["update_skipped"] for h in history) == 0.0


def test_lora_resume_is_bit_for_bit_and_refuses_another_base(tmp_path):
    full, h_full = run(lora_config(tmp_path / "full"))
    run(lora_config(tmp_path / "part"), until=2)
    cfg = lora_config(tmp_path / "part")
    cfg.resume = True
    resumed, h_res = run(cfg)
    assert [h["step"] for h in h_res] == [3, 4]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(full.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.opt_state),
                 jax.device_get(full.state.opt_state))
    for a, b in zip(h_res, h_full[2:]):
        assert a["loss"] == b["loss"] and a["kl"] == b["kl"] and a["reward"] == b["reward"]

    # The checkpoint holds the adapters and names its base; another base (another seed's random
    # weights) is refused with both fingerprints.
    step = tmp_path / "full" / "checkpoints" / "4"
    assert sorted(os.listdir(step / "params")) and (step / "base").is_dir()
    other = lora_config(tmp_path / "full")
    other.seed, other.resume = 1, True
    with pytest.raises(ValueError, match=r"LoRA adapters of the base 'shape:tiny \(random, seed 0\)' \(fingerprint"):
        run(other)

    # A full fine-tune reading it stops too, and so does a LoRA run reading a full fine-tune's checkpoint.
    plain = lora_config(tmp_path / "full")
    plain.model.lora.rank, plain.resume = 0, True
    with pytest.raises(ValueError, match="does not match this run's train state"):
        run(plain)
    plain.workdir, plain.resume, plain.steps = str(tmp_path / "plain"), False, 1
    run(plain)
    cfg = lora_config(tmp_path / "plain")
    cfg.resume = True
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        run(cfg)


def test_a_lora_runs_policy_loads_and_exports_to_peft_and_a_merged_hf_folder(tmp_path):
    pytest.importorskip("peft")
    import peft
    import torch
    import transformers

    tr, _ = run(lora_config(tmp_path / "run", steps=2))
    pol, source = loading.load(lora_config(tmp_path / "run"), workdir=str(tmp_path / "run"))
    assert "LoRA on shape:tiny (random, seed 0)" in source and pol.model_cfg.lora_rank == RANK
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pol.params), jax.device_get(tr.params))

    ids = jnp.asarray(np.random.default_rng(0).integers(3, 90, (2, 7)))
    ours = np.asarray(transformer.forward(pol.params, pol.model_cfg, ids)[0])

    # PEFT: the adapters onto the transformers model of the base.
    hf.save_hf(jax.device_get(tr.state.frozen), lora.base_config(pol.model_cfg), tmp_path / "base")
    pol.export_peft(str(tmp_path / "peft"))
    with torch.no_grad():
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft")
        theirs = adapted(torch.tensor(np.asarray(ids))).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(pol.export_hf(str(tmp_path / "merged")),
                                                                   torch_dtype=torch.float32)
        theirs_merged = merged(torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4)
    np.testing.assert_allclose(theirs_merged, ours, atol=2e-4)


def test_merge_lora_samples_from_merged_weights(tmp_path):
    """sampling.merge_lora: the rollout copy has the adapters folded in (a plain model); by default
    the copy keeps them apart, as the trainer computes them."""
    tr, _ = run(lora_config(tmp_path / "run", steps=1))
    pol = tr.current_policy()
    unmerged, merged = pol.for_sampling(), pol.replace(merge_lora=True).for_sampling()
    assert unmerged.model_cfg.lora_rank == RANK and merged.model_cfg.lora_rank == 0
    assert "layers" in lora.split(unmerged.params)[1] and not lora.split(merged.params)[1]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged.params),
                 jax.device_get(lora.merged(pol.params, pol.model_cfg)))
    # The base's arrays are the sampler's as they are (already in the compute dtype): no copy.
    assert jax.tree.leaves(lora.split(unmerged.params)[0])[0] is jax.tree.leaves(tr.state.frozen)[0]


def test_a_lora_stage_adapts_the_previous_stages_policy(tmp_path):
    """A LoRA run with init_from: its frozen base (and reference) is that run's policy, in the
    compute dtype; a LoRA run started from a LoRA run gets the first one's adapters merged."""
    cold = tiny_config(tmp_path / "cold", steps=2)
    cold.trainer, cold.sft.data, cold.eval.every = "sft", "demonstrations", 0
    cold_run, _ = run(cold)
    cold_params = jax.device_get(cold_run.params)

    cfg = lora_config(tmp_path / "grpo", steps=2)
    cfg.init_from = str(tmp_path / "cold")
    first, _ = run(cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first.state.frozen), cold_params)

    again = lora_config(tmp_path / "again", steps=1)
    again.init_from = str(tmp_path / "grpo")
    second, _ = run(again)
    jax.tree.map(np.testing.assert_allclose, jax.device_get(second.state.frozen),
                 jax.device_get(lora.merged(first.params, first.policy.model_cfg)))


def test_lora_dropout_is_refused_by_name(tmp_path):
    cfg = lora_config(tmp_path)
    cfg.model.lora.dropout = 0.05
    with pytest.raises(ValueError, match=r"model.lora.dropout=0.05: LoRA dropout is not supported"):
        loading.load(cfg)


def test_lora_configs_share_the_full_cold_start():
    """configs/default_lora.py: its cold start is a full fine-tune with the default run's settings
    (the adapters' alpha and targets count only where rank > 0), its GRPO stage trains adapters."""
    from configs import default, default_lora

    full, lora_run = default.get_config(), default_lora.get_config()
    settings = lambda c, name: pipeline.stage_settings(pipeline.stage_config(c, name))
    assert settings(lora_run, "cold_start") == settings(full, "cold_start")
    grpo_stage = pipeline.stage_config(lora_run, "grpo")
    assert grpo_stage.model.lora.rank == 16 and settings(lora_run, "grpo") != settings(full, "grpo")
