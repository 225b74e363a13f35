"""Mixture-of-experts layers (Qwen3-MoE): top-k routing, the experts' weighted sum partitioned over
the expert and tensor axes, and the Switch Transformer load-balancing loss."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from grpo_jax.models import architecture
from grpo_jax.models import layers
from grpo_jax.parallel import partitioning


Array = jax.Array


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Qwen3-MoE; Shazeer et al. 2017, GShard, Lepikhin et al. 2020):

        p = softmax(x W_router)                                  [tokens, E], float32
        e_1..e_k = the k largest p;  g_i = p_{e_i}  (/ Σ_j p_{e_j} with norm_topk_prob)
        y = Σ_i g_i · W_down[e_i] (silu(x W_gate[e_i]) ⊙ x W_up[e_i])

    Returns y [B, T, d] and the layer's load-balancing statistics [2, E] over the real tokens
    (`token_mask`): per expert, its number of top-k assignments and its summed router probability
    (None when token_mask is None: the sampler does not pay for them).

    On a mesh the experts are split over the `expert` axis and each expert's width over `tensor`
    (partitioning.RULES). Rows are split over expert too (it is a batch axis elsewhere), so each
    device gathers the rows of its expert group, runs its own experts on the tokens routed to them and
    reduce-scatters the sums back to their rows (Megatron-LM's all-gather token dispatcher): no
    expert's weights ever move between expert-axis devices.
    """

    cfg: architecture.ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: Array, token_mask: Array | None) -> tuple[Array, Array | None]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        E, k, d, ff = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
        router = self.param("router", layers.param_init(("embed", None)), (d, E), pdt)
        w_gate = self.param("gate_proj", layers.param_init(("expert", "embed", "mlp")), (E, d, ff), pdt)
        w_up = self.param("up_proj", layers.param_init(("expert", "embed", "mlp")), (E, d, ff), pdt)
        w_down = self.param("down_proj", layers.param_init(("expert", "mlp", "embed")), (E, ff, d), pdt)

        logits = jnp.einsum("btd,de->bte", x, router.astype(dt), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = _top_k(probs, k, self.mesh)  # [B, T, k]
        if cfg.norm_topk_prob:
            gates = gates / gates.sum(-1, keepdims=True)

        stats = None
        if token_mask is not None:  # sums over the rows (a one-hot contraction, not a scatter: rows stay split)
            real = token_mask.astype(jnp.float32)
            counts = jnp.einsum("btke,bt->e", jax.nn.one_hot(experts, E, dtype=jnp.float32), real)
            stats = jnp.stack([counts, jnp.einsum("bte,bt->e", probs, real)])

        y = _experts(x, experts, gates.astype(dt), *(w.astype(dt) for w in (w_gate, w_up, w_down)), cfg, self.mesh)
        return y, stats


def _top_k(probs: Array, k: int, mesh: Mesh | None) -> tuple[Array, Array]:
    """lax.top_k over the last axis, on each device's own rows: XLA's partitioner would otherwise
    all-gather the whole batch's [B, T, E] probabilities for the top-k custom call."""
    if mesh is None or mesh.size == 1:
        return jax.lax.top_k(probs, k)
    rows = partitioning.row_axes(probs.shape[0], mesh)
    P = jax.sharding.PartitionSpec
    return jax.shard_map(lambda p: tuple(jax.lax.top_k(p, k)), mesh=mesh, in_specs=P(rows),
                         out_specs=(P(rows), P(rows)))(probs)


def _expert_mix(x: Array, experts: Array, gates: Array, w_gate: Array, w_up: Array, w_down: Array, first: Array,
                impl: str, act) -> Array:
    """Σ_i gates_i · expert_{experts_i}(x) over the experts held here, [first, first + E_here).

    x [B, T, d]; experts, gates [B, T, k]; w_gate, w_up [E_here, d, f]; w_down [E_here, f, d].
    Assignments to experts held elsewhere contribute nothing (another device adds them)."""
    B, T, d = x.shape
    k, here = experts.shape[-1], w_gate.shape[0]
    x = x.reshape(-1, d)
    local = experts.reshape(-1, k) - first  # [N, k]; outside [0, here): held elsewhere
    gates = gates.reshape(-1, k)
    if impl == "dense":
        weight = (jax.nn.one_hot(local, here, dtype=gates.dtype) * gates[..., None]).sum(1)  # [N, E_here]
        h = act(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
        return jnp.einsum("nef,efd,ne->nd", h, w_down, weight).reshape(B, T, d)
    flat = local.reshape(-1)
    group = jnp.where((flat >= 0) & (flat < here), flat, here)  # held elsewhere: sorted to the end
    order = jnp.argsort(group, stable=True)  # [N k]: assignments grouped by expert
    sizes = jnp.zeros((here + 1,), jnp.int32).at[group].add(1)[:here]
    token = order // k
    xs = x[token]
    h = act(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    ys = jax.lax.ragged_dot(h, w_down, sizes)  # rows past the groups (held elsewhere) are 0
    ys = ys * gates.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(ys).reshape(B, T, d)


def _experts(x, experts, gates, w_gate, w_up, w_down, cfg: architecture.ModelConfig, mesh: Mesh | None) -> Array:
    """The experts' weighted sum for every token, partitioned over `mesh` (see MoE)."""
    impl = cfg.moe_impl
    if impl == "auto":
        impl = "dense" if jax.default_backend() == "cpu" else "ragged"
    mix = functools.partial(_expert_mix, impl=impl, act=layers.activation(cfg))
    if mesh is None or mesh.size == 1:
        return mix(x, experts, gates, w_gate, w_up, w_down, 0)
    rows = partitioning.row_axes(x.shape[0], mesh)
    ex, _, ff = partitioning.to_mesh_spec(("expert", None, "mlp"), w_gate.shape, mesh)
    gather = ex is not None and ex in partitioning.mesh_axes(rows)

    def local(x, experts, gates, w_gate, w_up, w_down):
        if gather:  # the expert group's rows: every token that may be routed to the experts here
            x, experts, gates = (jax.lax.all_gather(a, ex, axis=0, tiled=True) for a in (x, experts, gates))
        first = 0 if ex is None else jax.lax.axis_index(ex) * w_gate.shape[0]
        y = mix(x, experts, gates, w_gate, w_up, w_down, first)
        if ff is not None:
            y = jax.lax.psum(y, ff)
        if ex is not None:
            y = jax.lax.psum_scatter(y, ex, scatter_dimension=0, tiled=True) if gather else jax.lax.psum(y, ex)
        return y

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows),) * 3 + (P(ex, None, ff),) * 2 + (P(ex, ff, None),),
                         out_specs=P(rows))(x, experts, gates, w_gate, w_up, w_down)


def router_balance_loss(stats: Array | None, num_tokens: Array, cfg: architecture.ModelConfig) -> Array:
    """The Switch Transformer's load-balancing loss (Fedus et al. 2021, eqs. 4-6) over all MoE layers,
    as transformers' load_balancing_loss_func computes it for Qwen3-MoE:

        loss = E · Σ_e f_e · P_e,   f_e = (top-k assignments to e) / (L · tokens),
                                    P_e = (Σ router probability of e) / (L · tokens),

    the sums over every layer's real tokens. Minimal (k) when routing is uniform; the gradient flows
    through P. stats [2, E] are the layers' summed (assignments, probabilities); None: a dense model."""
    if stats is None:
        return jnp.zeros((), jnp.float32)
    rows = jnp.maximum(num_tokens.astype(jnp.float32) * cfg.num_layers, 1.0)
    return cfg.num_experts * jnp.sum((stats[0] / rows) * (stats[1] / rows))
