"""kvfx custom ops: what the FX rewrite puts in place of attention and of the
cache write-back.

Both are ``torch.library`` custom ops so Inductor treats them as opaque calls
with known output shapes (the fake implementations), whatever they launch
inside: the plain-torch references on CPU, Triton kernels on CUDA.

State carried per cache slot (DESIGN.md §4): ``slot_bias`` [B, Hkv, S] float32,
added to the attention logit of every query for that slot: 0 for a plain
token, ``-inf`` for an invalid (padding) slot, ``log(count)`` for a slot that
stands for several tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kvfx import store as slot_store
from kvfx.kernels import attention as attention_kernels
from kvfx.kernels.attention.reference import head_biased_attention, sink_weight
from kvfx.kernels.column_sums import attention_with_column_sums
from kvfx.kernels.paged_attention import paged_attention
from kvfx.kernels.paged_attention.reference import paged_sink_weight
from kvfx.policies import bias_of, policy_of
from kvfx.policies.base import Policy
from kvfx.policies.expected import rotary_embedding
from kvfx.policies.scores import out_projection, prompt_lse
from kvfx.policies.budgets import cdiv


def valid_slots(mask: Optional[Tensor], batch: int, length: int, device) -> Tensor:
    """Which key slots are real tokens, read off the model's attention mask.

    mask: [B or 1, 1 or H, Sq, >= S], bool (True = attend) or additive float.
    The last query sees every real token before it, so its row is the padding
    mask. Returns [B, S] bool.
    """
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, :length]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, length)


@torch.library.custom_op("kvfx::compress", mutates_args=())
def compress(
    q: Optional[Tensor], k: Tensor, v: Tensor, mask: Optional[Tensor], reuse_index: Optional[Tensor],
    policy: str, layer: int, n_layers: int, scale: float, score_keys: Optional[Tensor] = None,
    lse: Optional[Tensor] = None, sums: Optional[Tensor] = None, out_proj: Optional[Tensor] = None,
    rotary: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Compress one layer's prompt cache with the policy whose registry key is
    ``policy`` (``kvfx.policies.key_of``). q: [B, H, Sq, D] (None for a policy
    that reads no queries), k/v: [B, Hkv, S, D]. ``reuse_index`` (ChunkKV) are
    kept indices computed by an earlier layer. ``score_keys`` [B, H, S, D]:
    the keys attention reads when k, v are a latent and a rotary key (MLA):
    slots are scored on them and one selection serves every head. ``lse``
    [B, H, S]: the prompt attention's log-sum-exp per query
    (``kvfx::attention_lse``), lent to a column-sum scorer; ``sums`` [B, Hkv,
    S]: the column sums themselves (``kvfx::attention_column_sums``, summed
    with the policy's ``sum_terms``). ``out_proj`` [hidden, H x Dv]: the
    weight of the linear layer reading the attention output, lent to a score
    that weighs values by it (``CriticalKV``). ``rotary`` [2, B or 1, 1, S,
    r]: the cos and sin of the queries' rotary embedding, lent with q taken
    before it to a score that ``needs_rotary`` (``ExpectedAttention``; None:
    unrotated queries). Returns fresh contiguous (k,
    v, slot_bias, slot_score, index) with n = policy.kept_length(S) slots."""
    pol = policy_of(policy)
    valid = valid_slots(mask, k.shape[0], k.shape[2], k.device)
    with prompt_lse(q, lse, sums, pol.sum_terms()), out_projection(out_proj), rotary_embedding(rotary):
        out = pol.compress(q, k, v, valid, scale, layer, n_layers, reuse_index, score_keys)
    # A custom op's outputs may not alias its inputs (the reused index would).
    index = out.index.clone() if out.index is reuse_index else out.index.contiguous()
    return out.k.contiguous(), out.v.contiguous(), out.slot_bias.contiguous(), out.slot_score.contiguous(), index


@compress.register_fake
def _compress_fake(q, k, v, mask, reuse_index, policy, layer, n_layers, scale, score_keys=None, lse=None,
                   sums=None, out_proj=None, rotary=None):
    batch, kv_heads, length, _ = k.shape
    n = policy_of(policy).kept_length(length, layer, n_layers)
    return (
        k.new_empty(batch, kv_heads, n, k.shape[-1]),
        v.new_empty(batch, kv_heads, n, v.shape[-1]),
        k.new_empty(batch, kv_heads, n, dtype=torch.float32),
        k.new_empty(batch, kv_heads, n, dtype=torch.float32),
        k.new_empty(batch, kv_heads, n, dtype=torch.int64),
    )


def lse_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``attention_lse`` gets the log-sum-exp from a fused kernel for
    these inputs (decided on metadata alone, so the fake agrees): the CPU's
    flash kernel; on CUDA the flash kernel's dtypes and head sizes (values as
    wide as keys, whole query groups, either way)."""
    if q.shape[-1] != v.shape[-1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    if q.device.type == "cpu":
        return True
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and torch.cuda.get_device_capability(q.device) >= (8, 0))


@torch.library.custom_op("kvfx::attention_lse", mutates_args=())
def attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """The prompt's causal attention (what ``scaled_dot_product_attention(q,
    k, v, is_causal=True, scale=scale)`` computes; fewer KV heads than query
    heads are grouped) and each query's log-sum-exp [B, H, Sq] float32, which
    the fused kernel computes anyway: the column-sum scorers (H2O, KVMerger,
    ZeroMerge) then need one pass over q.k instead of two. Where no fused
    kernel returns it (``lse_supported``), the lse is empty."""
    if not lse_supported(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                               enable_gqa=k.shape[1] != q.shape[1])
        return out.contiguous(), q.new_empty(0, dtype=torch.float32)
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
    return out.contiguous(), lse.contiguous()


@attention_lse.register_fake
def _attention_lse_fake(q, k, v, scale):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if not lse_supported(q, k, v):
        return out, q.new_empty(0, dtype=torch.float32)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def sums_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``attention_column_sums`` serves these inputs: float32 on the
    CPU, whole query groups. Elsewhere the flash kernels are the faster
    attention and ``attention_lse`` lends their log-sum-exp."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and k.shape[1] > 0
            and q.shape[1] % k.shape[1] == 0 and q.shape[-2] == k.shape[-2])


@torch.library.custom_op("kvfx::attention_column_sums", mutates_args=())
def attention_column_sums(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], decay: float,
                          queries: int) -> tuple[Tensor, Tensor]:
    """The prompt's causal attention (as ``attention_lse``) and the column
    sums a column-sum scorer needs [B, Hkv, S] float32, from one pass over
    q.k (``attention_with_column_sums``; ``sums_supported`` inputs only):
    ``decay`` and ``queries`` are the policy's ``sum_terms``."""
    return attention_with_column_sums(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, decay, queries)


@attention_column_sums.register_fake
def _attention_column_sums_fake(q, k, v, scale, decay, queries):
    return (q.new_empty(*q.shape[:-1], v.shape[-1]),
            q.new_empty(k.shape[0], k.shape[1], k.shape[2], dtype=torch.float32))


@torch.library.custom_op("kvfx::attend", mutates_args=())
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slot_bias: Tensor,
    slot_score: Tensor,
    seen: Tensor,
    mask: Optional[Tensor],
    scale: float,
    softcap: float,
    sinks: Optional[Tensor] = None,
    head_bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention of new queries over cached slots + the new tokens.

    q: [B, H, Sq, D]; k, v: [B, Hkv, S, D] where the last Sq slots are the new
    tokens; slot_bias, slot_score: [B, Hkv, S - Sq] for the cached slots;
    seen: 0-d int64, the tokens the cache has absorbed, or -1 for a cache that
    carries no kvfx state.

    With state, the cached slots get ``slot_bias`` and the new tokens are
    causal among themselves: the model's own mask is ignored because it was
    computed for the uncompressed positions. Without state (a cache kvfx never
    compressed) the model's mask is right and is used as is.

    ``sinks``: learned per-head sink logits (gpt-oss), broadcast to
    [B, H, Sq, 1], joined to each query's softmax and dropped after it.
    ``head_bias``: the model's per-head score bias over all S slots
    (broadcasting to [B, H, Sq, S]: ALiBi, Doge's dynamic mask), which the
    model computed for this very cache; added to every logit.

    Returns (out [B, H, Sq, Dv], slot_bias and slot_score for all S slots, the
    new ones 0, and the tokens seen after this call).
    """
    batch, kv_heads, length, _ = k.shape
    past = length - q.shape[-2]
    # Chosen on the device (no host read of ``seen``): a decode step never synchronises.
    has_state = seen >= 0
    slot_bias = torch.where(has_state, slot_bias, _bias_from_mask(mask, batch, kv_heads, past, k.device))
    if head_bias is None:
        out = attention_kernels.slot_attention(q, k, v, slot_bias, scale, softcap)
    else:
        out = head_biased_attention(q, k, v, slot_bias, head_bias, scale, softcap)
    if sinks is not None:  # learned sink logits (broadcast to [B, H, Sq, 1]) take their share of the softmax
        out = (out.float() * sink_weight(q, k, slot_bias, sinks, scale, softcap, head_bias)).to(out.dtype)
    grow = (0, length - past)
    seen_after = torch.where(has_state, seen, past) + q.shape[-2]
    return out, torch.nn.functional.pad(slot_bias, grow), torch.nn.functional.pad(slot_score, grow), seen_after


@attend.register_fake
def _attend_fake(q, k, v, slot_bias, slot_score, seen, mask, scale, softcap, sinks=None, head_bias=None):
    batch, kv_heads, length, _ = k.shape
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    state = k.new_empty(batch, kv_heads, length, dtype=torch.float32)
    return out, state, torch.empty_like(state), torch.empty_like(seen)


@torch.library.custom_op("kvfx::step", mutates_args=())
def step(
    q: Tensor, k: Tensor, v: Tensor, slot_bias: Tensor, slot_score: Tensor,
    policy: str, layer: int, n_layers: int, scale: float, out_proj: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decode step of a continuous policy (TOVA, ZeroMerge) over the cache
    including the new tokens; returns (k, v, slot_bias, slot_score) with
    policy.decode_length(S, Sq) slots. ``out_proj``: as for ``kvfx::compress``
    (a recompression that weighs values by it: Recompress of CriticalKV)."""
    with out_projection(out_proj):
        out = policy_of(policy).step(q, k, v, slot_bias, slot_score, scale, layer, n_layers)
    # A step with nothing to evict (a budget not reached yet) may hand back its
    # inputs; a custom op's outputs must not alias them.
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, slot_bias, slot_score)}
    return tuple(t.clone(memory_format=torch.contiguous_format) if t.untyped_storage().data_ptr() in inputs
                 else t.contiguous() for t in out)


@step.register_fake
def _step_fake(q, k, v, slot_bias, slot_score, policy, layer, n_layers, scale, out_proj=None):
    batch, kv_heads, length, _ = k.shape
    n = policy_of(policy).decode_length(length, q.shape[-2])
    return (k.new_empty(batch, kv_heads, n, k.shape[-1]), v.new_empty(batch, kv_heads, n, v.shape[-1]),
            k.new_empty(batch, kv_heads, n, dtype=torch.float32), k.new_empty(batch, kv_heads, n, dtype=torch.float32))


def _bias_from_mask(mask: Optional[Tensor], batch: int, kv_heads: int, past: int, device) -> Tensor:
    return bias_of(valid_slots(mask, batch, past, device)[:, None, :].expand(batch, kv_heads, past))


# -- the slot store (kvfx.store) ---------------------------------------------------
#
# A layer's store travels through the graph as its eight tensors, always in
# ``Store.FIELDS`` order (k_pages, v_pages, slot_bias, slot_score, page_table,
# lengths, pages, seen), plus ``extent``: a tensor of shape [0, L] whose
# second size is the row length a continuous policy's step works on (it holds
# no data; a shape keeps the length symbolic, so it never recompiles).
# Appending a decode step's tokens is not an op: it is plain tensor code
# (``kvfx.store.append``) that the inner compiler fuses into the graph and
# writes in place.

def _store_fakes(k: Tensor, v: Tensor, n_pages, width, page: int, scores: bool = True) -> tuple[Tensor, ...]:
    batch, kv_heads = k.shape[:2]
    return (
        k.new_empty(n_pages, page, k.shape[-1]), v.new_empty(n_pages, page, v.shape[-1]),
        k.new_empty(n_pages, page, dtype=torch.float32),
        k.new_empty(n_pages if scores else 0, page, dtype=torch.float32),
        k.new_empty(batch, kv_heads, width, dtype=torch.int64), k.new_empty(batch, kv_heads, dtype=torch.int64),
        k.new_empty(batch, kv_heads, dtype=torch.int64), k.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("kvfx::store_mark", mutates_args=())
def store_mark(k: Tensor, v: Tensor, page: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What a kvfx cache layer's ``update`` calls on its first (prefill) call:
    it marks where the layer's store is born. The rewrite replaces it with
    ``kvfx::store_compress`` right after the layer's attention; it never runs."""
    raise RuntimeError(
        "kvfx: a kvfx cache layer was filled by a graph kvfx did not rewrite (its attention call was not "
        "recognised). TORCH_LOGS=+kvfx says what kvfx saw in each graph.")


@store_mark.register_fake
def _store_mark_fake(k, v, page):
    batch, kv_heads, length = k.shape[:3]
    width = cdiv(length, page)
    return _store_fakes(k, v, batch * kv_heads * width, width, page)


@torch.library.custom_op("kvfx::store_compress", mutates_args=())
def store_compress(
    q: Optional[Tensor], k: Tensor, v: Tensor, mask: Optional[Tensor], reuse_index: Optional[Tensor],
    policy: str, layer: int, n_layers: int, scale: float, page: int, lse: Optional[Tensor] = None,
    sums: Optional[Tensor] = None, out_proj: Optional[Tensor] = None, rotary: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Compress one layer's prompt k, v [B, Hkv, S, D] with ``policy`` into a
    new slot store of ``page``-slot pages: each (batch, KV head) row holds its
    own kept slots (``Policy.store_pages`` sizes it), a running score only for
    a continuous policy. Returns the store's eight tensors (seen = S) and the
    kept indices (for ChunkKV's reuse). ``lse``, ``sums``, ``out_proj``,
    ``rotary``: as for ``kvfx::compress``."""
    pol = policy_of(policy)
    batch, kv_heads, length = k.shape[:3]
    valid = valid_slots(mask, batch, length, k.device)
    with prompt_lse(q, lse, sums, pol.sum_terms()), out_projection(out_proj), rotary_embedding(rotary):
        out = pol.compress(q, k, v, valid, scale, layer, n_layers, reuse_index)
    pages, width = pol.store_pages(length, layer, n_layers, kv_heads, page)
    # Only a policy that ranks by a running score reads it again: the others keep none.
    score = out.slot_score if pol.keeps_running_score else None
    store = slot_store.pack(out.k, out.v, out.slot_bias, score, out.lengths(), batch * pages, width, page)
    store.seen.fill_(length)
    index = out.index.clone() if out.index is reuse_index else out.index.contiguous()
    return (*store.tensors(), index)


@store_compress.register_fake
def _store_compress_fake(q, k, v, mask, reuse_index, policy, layer, n_layers, scale, page, lse=None, sums=None,
                         out_proj=None, rotary=None):
    pol = policy_of(policy)
    batch, kv_heads, length = k.shape[:3]
    pages, width = pol.store_pages(length, layer, n_layers, kv_heads, page)
    index = k.new_empty(batch, kv_heads, pol.kept_length(length, layer, n_layers), dtype=torch.int64)
    return (*_store_fakes(k, v, batch * pages, width, page, pol.keeps_running_score), index)


@torch.library.custom_op("kvfx::store_read", mutates_args=())
def store_read(
    k: Tensor, v: Tensor, k_pages: Tensor, v_pages: Tensor, slot_bias: Tensor, slot_score: Tensor,
    page_table: Tensor, lengths: Tensor, pages: Tensor, seen: Tensor, extent: Tensor,
) -> tuple[Tensor, Tensor]:
    """What a kvfx cache layer's ``update`` hands the model's attention on a
    decode call, after appending the new tokens to its store (plain tensor
    ops, which the inner compiler fuses): the new tokens' k, v, tagged with
    the whole store (and ``extent``) so that the rewrite finds every tensor of
    the layer's store at the layer's attention, which it replaces by
    ``kvfx::store_attend``; the tag is then dead. It never runs."""
    raise RuntimeError(
        "kvfx: a kvfx cache layer was read by an attention kvfx did not rewrite (it was not recognised). "
        "TORCH_LOGS=+kvfx says what kvfx saw in each graph.")


@store_read.register_fake
def _store_read_fake(k, v, k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen, extent):
    return torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("kvfx::store_attend", mutates_args=())
def store_attend(
    q: Tensor, k_pages: Tensor, v_pages: Tensor, slot_bias: Tensor, page_table: Tensor, lengths: Tensor,
    scale: float, softcap: float, sinks: Optional[Tensor] = None,
) -> Tensor:
    """Attention of q [B, H, Sq, D] over each row's slots in the store (the
    last Sq of a row are the queries' own tokens, causal among themselves).
    The mask is the store's own: padding and merged slots are in slot_bias,
    so layers of different lengths and padded batches need no model mask.
    ``sinks``: learned sink logits, as for ``kvfx::attend``."""
    out = paged_attention(q, k_pages, v_pages, slot_bias, page_table, lengths, scale, softcap)
    if sinks is not None:
        weight = paged_sink_weight(q, k_pages, slot_bias, page_table, lengths, sinks, scale, softcap)
        out = (out.float() * weight).to(out.dtype)
    return out


@store_attend.register_fake
def _store_attend_fake(q, k_pages, v_pages, slot_bias, page_table, lengths, scale, softcap, sinks=None):
    return q.new_empty(*q.shape[:-1], v_pages.shape[-1])


# The decode step runs once per layer and token. It is defined on
# torch.library's low-level API: a call dispatches in ~3 us, where a
# ``custom_op`` (argument defaults, version counters, autograd wrapper) spends
# ~100 us, as much as the step itself on a CPU. Dynamo and Inductor read its
# mutations off the schema, as for any in-place op.
_LIB = torch.library.Library("kvfx", "FRAGMENT")
_LIB.define("store_step(Tensor q, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) slot_bias, "
            "Tensor(d!) slot_score, Tensor(e!) page_table, Tensor(f!) lengths, Tensor(g!) pages, Tensor seen, "
            "Tensor extent, str policy, int layer, int n_layers, float scale, Tensor? out_proj=None) -> ()")


def _store_step(
    q: Tensor, k_pages: Tensor, v_pages: Tensor, slot_bias: Tensor, slot_score: Tensor, page_table: Tensor,
    lengths: Tensor, pages: Tensor, seen: Tensor, extent: Tensor,
    policy: str, layer: int, n_layers: int, scale: float, out_proj: Optional[Tensor] = None,
) -> None:
    """One decode step of a continuous policy (TOVA, ZeroMerge) over a store
    whose rows all hold ``extent.shape[1]`` slots (the new tokens included):
    the policy's step on those rows, written back in place. Rows that hold
    their own counts (``ragged_rows``) hold that many on average.
    ``out_proj``: as for ``kvfx::step``."""
    width, pol = extent.shape[1], policy_of(policy)
    if pol.idle_step(width, q.shape[-2]):
        return  # rows not due yet (Recompress): nothing to rank, move or gather
    with out_projection(out_proj):
        _store_step_on(q, k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen, width, pol,
                       layer, n_layers, scale)


def _store_step_on(q, k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen, width: int,
                   pol: Policy, layer: int, n_layers: int, scale: float) -> None:
    store = slot_store.Store(k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen)
    if pol.ragged_rows:
        _ragged_step(store, q, width, pol, scale, layer, n_layers)
        return
    if pol.step_scores_only(width, q.shape[-2]):   # (Recompress gathering attention): no copy of the values
        k, _, bias, score = slot_store.gather(store, width, values=False)
        slot_store.write_scores(store, width, pol.step(q, k, None, bias, score, scale, layer, n_layers)[3])
        return
    views = slot_store.row_views(store, width) if q.shape[-2] == 1 and type(pol).step is Policy.step else None
    if views is not None:  # the fold's step written into the pages themselves (CPU, equal full rows)
        k, v, bias, old = views
        score = pol.step_score(q, k, bias, old, scale)
        plan = pol.fold().plan_step(pol, score, k, v, bias)
        if plan is not None:
            slot_store.apply_step(store, width, score, plan)
            lengths.fill_(pol.decode_length(width, 1))
            return
    k, v, bias, score = slot_store.gather(store, width)
    slot_store.scatter(store, *pol.step(q, k, v, bias, score, scale, layer, n_layers), width)


def _ragged_step(store, q: Tensor, width: int, pol: Policy, scale: float, layer: int, n_layers: int) -> None:
    """``Recompress`` of a budget the KV heads share (AdaKV) over rows of
    different lengths: read every row as wide as the longest can be (a batch
    row's heads hold ``Hkv x width`` slots at most), then add the gathered
    score, or repage the rows to their kept slots with room for the tokens
    before the next recompression (the pool and table were sized for it
    between calls: ``KvfxLayer.reserve``)."""
    kv_heads = store.page_table.shape[1]
    wide = min(store.page_table.shape[2] * store.page, kv_heads * width)
    if store.k_pages.device.type == "cpu":   # the longest row, read where a host read costs nothing
        wide = max(1, min(wide, int(store.lengths.max())))
    new = q.shape[-2]
    if pol.step_scores_only(width, new):
        k, _, bias, score = slot_store.gather(store, wide, values=False)
        after = pol.step_rows(q, k, None, bias, score, scale, width, layer, n_layers)[3]
        slot_store.add_scores(store, wide, (after - score).masked_fill(bias == float("-inf"), 0.0))
        return
    k, v, bias, score = slot_store.gather(store, wide)
    k, v, bias, score = pol.step_rows(q, k, v, bias, score, scale, width, layer, n_layers)
    after = pol.decode_length(width, new)
    slot_store.repack(store, k, v, bias, score, (bias != float("-inf")).sum(-1), pol.room_after(after))


_LIB.impl("store_step", _store_step, "CompositeExplicitAutograd")
store_step = torch.ops.kvfx.store_step.default


@torch.library.register_fake("kvfx::store_step")
def _store_step_fake(q, k_pages, v_pages, slot_bias, slot_score, page_table, lengths, pages, seen, extent,
                     policy, layer, n_layers, scale, out_proj=None):
    return None


# kvfx compresses caches for inference: no gradient flows through its ops.
# Registering that keeps a forward run with grad enabled from failing inside
# AOTAutograd.
compress.register_autograd(lambda ctx, *grads: (None,) * 14)
attention_lse.register_autograd(lambda ctx, *grads: (None,) * 4)
attention_column_sums.register_autograd(lambda ctx, *grads: (None,) * 6)
attend.register_autograd(lambda ctx, *grads: (None,) * 11)
step.register_autograd(lambda ctx, *grads: (None,) * 10)
store_compress.register_autograd(lambda ctx, *grads: (None,) * 14)
store_attend.register_autograd(lambda ctx, *grads: (None,) * 9)
