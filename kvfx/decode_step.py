"""A continuous policy's decode attention and step as plain tensor code the
rewrite puts in the graph itself (``passes.rewrite``): on the CPU, over a
store whose rows all hold the same slots in the canonical layout, under
Inductor. The inner compiler fuses the step's small operations into a few
loops, and the step ranks slots by the attention the layer's output was
computed from, so a TOVA or ZeroMerge decode step costs no custom-op
dispatch, no chain of eager operations and no second pass over q.k (issue
16). Its writes are slot-sized ``index_copy_``s into the pages
(``kvfx.store.apply_step``), which Inductor performs in place; a scatter
into a view of the pages would copy the whole store every step."""

from __future__ import annotations

import torch

from kvfx import store as slot_store
from kvfx.policies import Policy
from kvfx.policies.fold import Fold
from kvfx.policies.registry import policy_of


def steps_in_graph(policy) -> bool:
    """Whether ``attention_and_step`` runs ``policy``'s decode step: a policy
    with a running score, the base ``step`` (one removal per token), a
    ``step_score`` over the newest query's attention and a fold with a
    ``plan_step``."""
    return (policy.keeps_running_score and type(policy).step is Policy.step and policy.steps_on_attention
            and type(policy.fold()).plan_step is not Fold.plan_step)


def attention_and_step(q, k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen, extent,
                       kv_heads: int, scale: float, policy: str, layer: int, n_layers: int) -> torch.Tensor:
    """``paged_attention_uniform``'s output for one new token per row, then
    ``policy``'s decode step over the rows of ``extent.shape[1]`` slots
    written into the store (as ``kvfx::store_step``), ranked by the
    probabilities this attention computed. q: [B, H, 1, D]; returns
    [B, H, 1, Dv]. The probabilities are formed in float32 (the step's
    scores need them); the output equals SDPA's to float32 rounding."""
    b, h, sq, d = q.shape
    width = extent.shape[1]
    k = k_pages.view(b, kv_heads, -1, k_pages.shape[-1])
    v = v_pages.view(b, kv_heads, -1, v_pages.shape[-1])
    bias = slot_bias.view(b, kv_heads, -1)
    rows = q.reshape(b, kv_heads, (h // kv_heads) * sq, d).float()   # a GQA group's heads share their KV head's row
    probs = (rows @ k.float().transpose(-1, -2) * scale + bias[:, :, None]).softmax(-1)
    out = (probs @ v.float()).to(q.dtype).reshape(b, h, sq, -1)
    pol = policy_of(policy)
    store = slot_store.Store(k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen)
    # The rows' first ``width`` slots are read by index through the page table
    # (the layout is canonical, so a pool index is also the index into the
    # rows' [B, Hkv, capacity]), never sliced or addressed as row * capacity:
    # each use of the symbolic capacity adds a shape guard or an index
    # expression that slows the compile of a many-layer graph by minutes.
    every = slot_store.flat_index(store, torch.arange(width, device=q.device).expand(b, kv_heads, width))

    def rows_of(x):
        return x.reshape(-1).index_select(0, every).view(b, kv_heads, width)

    score = pol.running_score(rows_of(probs.mean(2)), rows_of(slot_score))
    plan = pol.fold().plan_step(pol, score, k, v, rows_of(slot_bias))
    if plan is None:   # more than one removal per token: the op (over copies)
        torch.ops.kvfx.store_step(q, k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen,
                                  extent, policy, layer, n_layers, scale)
        return out
    slot_store.apply_step(store, width, score, plan)
    lengths.fill_(pol.decode_length(width, 1))
    return out
