"""The slot store: kvfx's own storage for one compressed layer (DESIGN.md §8).

Keys and values live in pages of ``page`` slots shared by all (batch, KV head)
rows of the layer; each row owns a list of pages (its page table) and a
length, so a row holds its own number of slots -- a retrieval head all of
them, another head a handful -- and the layer costs the sum over its rows,
never its longest row times the row count. The per-slot state (attention
bias, running score) lives in pages beside the keys. Nothing here reads a
device tensor on the host: every size is computed from shapes, so a decode
step never synchronises and its shapes stay fixed until the next growth.

A store is kept in a canonical layout: each row's pages are consecutive and
rows follow each other in (batch, KV head) order (``pack``, ``grow`` and
``select_rows`` all write it so), which lets the CPU attention read a store of
equal rows in place; kernels read any page table.

Tensors of a store (``Store``), with R = B * Hkv rows and N pages:
  k_pages [N, P, D], v_pages [N, P, Dv]   keys and values
  slot_bias [N, P] float32                added to the attention logit (-inf: invalid, log(count): merged);
                                          -inf at every slot past its row's length (an invariant every writer keeps)
  slot_score [N, P] float32               running score, for continuous policies only ([0, P] for the others)
  page_table [B, Hkv, M] int64            page ids of each row, in slot order (unused entries: 0)
  lengths [B, Hkv] int64                  slots each row holds
  pages [B, Hkv] int64                    pages each row owns (its capacity is pages * P)
  seen [] int64                           tokens the layer has absorbed (positions follow it)
"""

from __future__ import annotations

import dataclasses
import torch
from torch.utils.weak import WeakIdKeyDictionary

from kvfx.kernels.paged_attention.reference import canonical, page_rows
from kvfx.policies.budgets import cdiv
from kvfx.policies.fold import drop_index

#: slots per page: small enough that a row wastes little (< one page), large
#: enough that a page is one contiguous read of P * D elements.
PAGE = 16
NEG_INF = float("-inf")


@dataclasses.dataclass
class Store:
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    slot_bias: torch.Tensor
    slot_score: torch.Tensor
    page_table: torch.Tensor
    lengths: torch.Tensor
    pages: torch.Tensor
    seen: torch.Tensor

    FIELDS = ("k_pages", "v_pages", "slot_bias", "slot_score", "page_table", "lengths", "pages", "seen")

    @property
    def page(self) -> int:
        return self.k_pages.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self.FIELDS)

    def nbytes(self) -> int:
        """Bytes the store holds: every page allocated (used or not) and all its state."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def state_bytes_per_slot(self) -> int:
        """Bytes of per-slot state: the bias, and the score when the store keeps one."""
        return sum(t.element_size() for t in (self.slot_bias, self.slot_score) if t.numel())


def prefill_bytes(policy, length, layer: int, n_layers: int, batch: int, kv_heads: int, slot_bytes: int,
                  page: int = PAGE):
    """Bytes the store ``store_compress`` makes of a ``length``-token prompt
    holds (``length`` an int or a sympy symbol, for a formula): its pages
    (``slot_bytes`` of K and V per slot, a float32 bias, and a float32 score
    for a continuous policy) and its tables (int64: each row's page table,
    length and page count; the tokens seen)."""
    pages, width = policy.store_pages(length, layer, n_layers, kv_heads, page)
    state = 8 if policy.keeps_running_score else 4
    return batch * pages * page * (slot_bytes + state) + batch * kv_heads * (width + 2) * 8 + 8


def _page_owners(pages: torch.Tensor, n_pages: int):
    """For each of ``n_pages`` pool pages: the row (flattened b, h) that owns it
    and its index within the row, when rows own consecutive runs of
    ``pages`` [R] pages in row order. Pages past the last row get row R."""
    ends = pages.cumsum(0)
    ids = torch.arange(n_pages, device=pages.device)
    row = torch.searchsorted(ends, ids, right=True)
    start = ends - pages
    j = ids - start[row.clamp(max=pages.shape[0] - 1)]
    return row, j, start


def _select(x: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, fill) -> torch.Tensor:
    """``x[index]`` along dim 0 where ``keep`` (shaped like ``index``), ``fill`` elsewhere."""
    out = x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])
    return out.masked_fill(~keep.view(*keep.shape, *([1] * (out.dim() - keep.dim()))), fill)


def _table(pages: torch.Tensor, start: torch.Tensor, width) -> torch.Tensor:
    """[R, width] page table: row r owns pages start[r] .. start[r] + pages[r] - 1."""
    j = torch.arange(width, device=pages.device)
    return torch.where(j < pages[:, None], start[:, None] + j, 0)


def pack(k, v, slot_bias, slot_score, lengths, n_pages, width, page: int = PAGE, room: int = 0) -> Store:
    """A store holding the first ``lengths`` [B, Hkv] slots of each row of the
    rectangular k/v [B, Hkv, W, D] (and their bias, score [B, Hkv, W]; score
    None: the store keeps none), in ``n_pages`` pages with a ``width``-page
    table, each row with pages for ``room`` more slots. Rows take pages in row
    order; pages beyond what the rows need stay empty (bias -inf)."""
    b, hkv, w, d = k.shape
    rows = b * hkv
    length = lengths.reshape(rows)
    pages = cdiv(length + room, page)
    owner, j, start = _page_owners(pages, n_pages)
    slot = (j[:, None] * page + torch.arange(page, device=k.device)).clamp(min=0)     # [N, P] slot within its row
    valid = (owner[:, None] < rows) & (slot < length[owner.clamp(max=rows - 1)][:, None])
    src = owner.clamp(max=rows - 1)[:, None] * w + slot.clamp(max=w - 1)               # into the flattened rows
    src = torch.where(valid, src, 0)

    def take(x, fill):
        return _select(x.reshape(rows * w, *x.shape[3:]), src, valid, fill).contiguous()

    return Store(
        k_pages=take(k, 0), v_pages=take(v, 0), slot_bias=take(slot_bias.float(), NEG_INF),
        slot_score=take(slot_score.float(), 0.0) if slot_score is not None else slot_bias.new_empty(0, page).float(),
        page_table=_table(pages, start, width).view(b, hkv, width).contiguous(),
        lengths=lengths.to(torch.int64).contiguous(), pages=pages.view(b, hkv).contiguous(),
        seen=torch.zeros((), dtype=torch.int64, device=k.device))


def _flat_slots(store: Store, slots: torch.Tensor) -> torch.Tensor:
    """Pool-wide slot index (page * P + offset) of row-relative ``slots`` [B, Hkv, n]."""
    p = store.page
    page = store.page_table.gather(2, slots // p)
    return page * p + slots % p


def _write(store: Store, flat: torch.Tensor, k, v, slot_bias, slot_score) -> None:
    """Write slots (k, v [..., D], bias and score [...]) at the pool-wide slot indices ``flat``, in place."""
    store.k_pages.view(-1, k.shape[-1]).index_copy_(0, flat, k.reshape(-1, k.shape[-1]))
    store.v_pages.view(-1, v.shape[-1]).index_copy_(0, flat, v.reshape(-1, v.shape[-1]))
    store.slot_bias.view(-1).index_copy_(0, flat, slot_bias.float().reshape(-1))
    if store.slot_score.numel():
        store.slot_score.view(-1).index_copy_(0, flat, slot_score.float().reshape(-1))


def flat_index(store: Store, slots: torch.Tensor) -> torch.Tensor:
    """Pool-wide indices [B * Hkv * n] of the row-relative ``slots`` [B, Hkv, n],
    through the page table (any layout; index arithmetic free of symbolic
    sizes, which a traced graph's loops analyse quickly)."""
    return _flat_slots(store, slots).reshape(-1)


def apply_step(store: Store, width: int, score: torch.Tensor, plan) -> None:
    """A continuous policy's decode step (``Fold.plan_step``'s ``StepPlan``)
    written into rows that all hold ``width`` slots, in place: the plan's
    write, then slot ``last`` into the hole at ``drop`` and the slots after it
    down one (``drop_index``); the freed last slot gets bias -inf (the
    invariant), score 0, and every slot its running ``score`` [B, Hkv, width].
    The caller sets the lengths.

    Every read of the store comes before its writes: the slots that change
    (a handful per row) are read, then written with one ``index_copy_`` per
    tensor; the scores are written over the row, then at the moved slots. A
    write followed by a read of the same pages would make a traced graph
    copy the whole store (functionalisation keeps the version read)."""
    b, hkv = store.page_table.shape[:2]
    every = flat_index(store, torch.arange(width, device=score.device).expand(b, hkv, width))
    score = score.float()
    if plan.drop is None:
        store.slot_score.view(-1).index_copy_(0, every, score.reshape(-1))
        return
    keep = drop_index(plan.drop, width, plan.last)                        # [B, Hkv, width - 1]: old slot of each new slot
    # The slots whose content changes: the hole, then last .. width - 2 (the
    # shifted tail). Where drop == last the two share a slot and a source.
    changed = torch.cat([plan.drop, torch.arange(plan.last, width - 1, device=score.device).expand(b, hkv, -1)], 2)
    source = keep.gather(2, changed.clamp(max=width - 2))                 # (drop == last == width - 1: a freed slot)
    rows, shape = flat_index(store, source), source.shape
    k, v = (pages.view(-1, pages.shape[-1]).index_select(0, rows).view(*shape, -1)
            for pages in (store.k_pages, store.v_pages))
    bias, moved_score = store.slot_bias.view(-1).index_select(0, rows).view(shape), score.gather(2, source)
    if plan.write is not None:   # the merged slot: not a hole, not in the tail
        slot, k_new, v_new, bias_new, score_new = plan.write
        changed, k, v = torch.cat([slot, changed], 2), torch.cat([k_new, k], 2), torch.cat([v_new, v], 2)
        bias, moved_score = torch.cat([bias_new.float(), bias], 2), torch.cat([score_new.float(), moved_score], 2)
    at, end = flat_index(store, changed), flat_index(store, torch.full_like(plan.drop, width - 1))
    store.k_pages.view(-1, k.shape[-1]).index_copy_(0, at, k.reshape(-1, k.shape[-1]))
    store.v_pages.view(-1, v.shape[-1]).index_copy_(0, at, v.reshape(-1, v.shape[-1]))
    store.slot_bias.view(-1).index_copy_(0, at, bias.reshape(-1))
    store.slot_bias.view(-1).index_fill_(0, end, NEG_INF)
    scores = store.slot_score.view(-1)
    scores.index_copy_(0, every, score.reshape(-1))   # every slot's running score, then the moves (no read between)
    scores.index_copy_(0, at, moved_score.reshape(-1))
    scores.index_fill_(0, end, 0.0)


def append(store: Store, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Write the new tokens' k/v [B, Hkv, q, D] after each row's slots, in place
    (bias 0, score 0), and count them. Every row must have room (``grow``)."""
    q = k_new.shape[2]
    slots = store.lengths[..., None] + torch.arange(q, device=k_new.device)
    zeros = torch.zeros(slots.shape, dtype=torch.float32, device=k_new.device)
    _write(store, flat_index(store, slots), k_new, v_new, zeros, zeros)
    store.lengths.add_(q)
    store.seen.add_(q)


def gather(store: Store, width: int, values: bool = True):
    """The first ``width`` slots of every row as rectangles (a copy): k, v
    [B, Hkv, width, D] (v None unless ``values``), slot_bias (-inf past a
    row's length), slot_score [B, Hkv, width]."""
    pages = [store.k_pages, store.slot_bias] + ([store.v_pages] if values else [])
    pages += [store.slot_score] if store.slot_score.numel() else []
    rows = [x[:, :, :width] for x in page_rows(store.page_table, cdiv(width, store.page), *pages, in_place=False)]
    k, bias = rows.pop(0), rows.pop(0)
    v = rows.pop(0) if values else None
    valid = torch.arange(width, device=store.lengths.device) < store.lengths[..., None]
    bias = bias.masked_fill(~valid, NEG_INF)
    return k, v, bias, rows[0] if rows else torch.zeros_like(bias)


def repack(store: Store, k, v, slot_bias, slot_score, lengths, room: int) -> None:
    """Rewrite the store in place to hold the first ``lengths`` [B, Hkv] slots
    of each row of the rectangles (as ``pack``), each row owning pages for
    ``room`` more, within the pool and table it has (a recompression of rows
    that hold different counts: the caller makes sure they fit)."""
    fresh = pack(k, v, slot_bias, slot_score if store.slot_score.numel() else None, lengths,
                 store.k_pages.shape[0], store.page_table.shape[2], store.page, room)
    for name in ("k_pages", "v_pages", "slot_bias", "slot_score", "page_table", "lengths", "pages"):
        getattr(store, name).copy_(getattr(fresh, name))


def add_scores(store: Store, width: int, delta: torch.Tensor) -> None:
    """Add delta [B, Hkv, width] to the running score of every row's first
    ``width`` slots, in place. delta must be 0 past a row's length: a slot
    past a row's pages is read through a table entry that names another
    row's page (``index_add_`` of 0 leaves it as it was, where a copy would
    race the owner's write)."""
    slots = torch.arange(width, device=delta.device).expand(*delta.shape[:2], width)
    store.slot_score.view(-1).index_add_(0, flat_index(store, slots), delta.float().reshape(-1))


def write_scores(store: Store, width: int, slot_score: torch.Tensor) -> None:
    """Overwrite the running score of every row's first ``width`` slots with
    slot_score [B, Hkv, width], in place (keys, values and bias stay)."""
    slots = torch.arange(width, device=slot_score.device).expand(*slot_score.shape[:2], width)
    store.slot_score.view(-1).index_copy_(0, flat_index(store, slots), slot_score.float().reshape(-1))


def row_views(store: Store, width: int):
    """k, v [B, Hkv, width, D], slot_bias, slot_score [B, Hkv, width]: views
    of the pages (writes land in the store) when the store is in the
    canonical layout, every row holds exactly ``width`` slots and keeps a
    score; else None. Reads the lengths (and the page table, once per table
    version) on the host: for CPU stores only, where that costs nothing."""
    if not store.slot_score.numel() or store.k_pages.device.type != "cpu":
        return None
    n, (b, hkv) = cdiv(width, store.page), store.page_table.shape[:2]
    if not bool((store.lengths == width).all()) or not _canonical(store.page_table, store.k_pages.shape[0], n):
        return None
    per_row = store.k_pages.shape[0] // (b * hkv) * store.page
    pages = (store.k_pages, store.v_pages, store.slot_bias, store.slot_score)
    return tuple(x.view(b, hkv, per_row, *x.shape[2:])[:, :, :width] for x in pages)


#: page table -> (its version, pool pages, pages read, canonical?): a decode
#: step asks every layer's table the same question; the table changes only
#: when the store grows or its rows are reordered, which bumps its version.
_CANONICAL = WeakIdKeyDictionary()


def _canonical(table: torch.Tensor, count: int, n: int) -> bool:
    if table.is_inference():   # (no version counter to key a cache on)
        return canonical(table, count, n)
    key = (table._version, count, n)
    hit = _CANONICAL.get(table)
    if hit is None or hit[0] != key:
        hit = _CANONICAL[table] = (key, canonical(table, count, n))
    return hit[1]


def scatter(store: Store, k, v, slot_bias, slot_score, width: int = 0) -> None:
    """Overwrite every row with the rectangles k, v [B, Hkv, n, D], slot_bias,
    slot_score [B, Hkv, n] (n slots each, within the rows' pages), in place.
    Rows held ``width`` slots before: the slots n .. width - 1 they give up get
    bias -inf, so that every slot past a row's length stays -inf (what
    ``paged_attention_uniform`` reads as the whole mask)."""
    n = k.shape[2]
    slots = torch.arange(n, device=k.device).expand(*k.shape[:2], n)
    _write(store, flat_index(store, slots), k, v, slot_bias, slot_score)
    if width > n:
        freed = torch.arange(n, width, device=k.device).expand(*k.shape[:2], width - n)
        store.slot_bias.view(-1).index_fill_(0, _flat_slots(store, freed).reshape(-1), NEG_INF)
    store.lengths.fill_(n)


def _relayout(store: Store, table, old_pages, new_pages, lengths, n_pages: int, width: int) -> Store:
    """A store in the canonical layout (each row's pages consecutive, rows in
    order): row r owns ``new_pages`` [B, Hkv] pages, its first ``old_pages``
    copied from this store's pages ``table`` [B, Hkv, M] names, the rest empty."""
    b, hkv, m = table.shape
    rows = b * hkv
    owner, j, start = _page_owners(new_pages.reshape(-1), n_pages)
    row = owner.clamp(max=rows - 1)
    copied = (owner < rows) & (j < old_pages.reshape(-1)[row])
    source = torch.where(copied, table.reshape(rows, m)[row, j.clamp(0, m - 1)], 0)

    def take(x, fill):
        return _select(x, source, copied, fill) if x.numel() else x  # (a state the store does not keep)

    return Store(take(store.k_pages, 0), take(store.v_pages, 0), take(store.slot_bias, NEG_INF),
                 take(store.slot_score, 0.0), _table(new_pages.reshape(-1), start, width).view(b, hkv, width),
                 lengths.clone(), new_pages.clone(), store.seen.clone())


def grow(store: Store, new_pages: int) -> Store:
    """A store with ``new_pages`` more pages for every row, its slots copied
    into the canonical layout (each row's pages consecutive: attention can
    read a store of equal rows in place). Sizes come from shapes only."""
    b, hkv, m = store.page_table.shape
    return _relayout(store, store.page_table, store.pages, store.pages + new_pages, store.lengths,
                     store.k_pages.shape[0] + b * hkv * new_pages, m + new_pages)


def resize(store: Store, n_pages: int, width: int) -> Store:
    """A store whose rows keep their pages and slots in a pool of ``n_pages``
    pages and a ``width``-page table (room for a recompression that repages
    ragged rows, or the pool cut back after it). ``n_pages`` must hold every
    row's pages."""
    return _relayout(store, store.page_table, store.pages, store.pages, store.lengths, n_pages, width)


def select_rows(store: Store, index: torch.Tensor) -> Store:
    """A store whose batch rows are ``index`` [B'] of this one's (beam search
    reorders, generation utilities repeat or select rows); each kept row gets
    its own copy of its pages. Allocates exactly the pages the rows own, which
    is read on the host once: this runs between decode steps, not in one."""
    pages = store.pages[index]
    return _relayout(store, store.page_table[index], pages, pages, store.lengths[index], int(pages.sum()),
                     store.page_table.shape[2])


def dense(store: Store):
    """Every row's slots as rectangles as wide as the longest row (for
    inspection and tests: a copy). Reads the longest length on the host."""
    width = int(store.lengths.max()) if store.lengths.numel() else 0
    return gather(store, width)


def keep_slots(store: Store, keep: torch.Tensor) -> Store:
    """A store holding, of each row, only the slots ``keep`` [B, Hkv, W] marks
    (W: the longest row), in order, in exactly the pages they need (KVzip's
    choice across layers, made after its prefill). Reads the kept counts on
    the host: this runs between calls, once."""
    k, v, bias, score = dense(store)
    width = k.shape[2]
    keep = keep[..., :width] & (bias != NEG_INF)
    position = torch.arange(width, device=keep.device)
    order = torch.where(keep, position, position + width).argsort(-1)   # kept slots first, in order
    lengths = keep.sum(-1)
    pages = cdiv(lengths, store.page)

    def take(x):
        return x.gather(2, order.view(*order.shape, *([1] * (x.dim() - 3))).expand_as(x))

    bias = take(bias).masked_fill(position >= lengths[..., None], NEG_INF)
    kept = pack(take(k), take(v), bias, take(score) if store.slot_score.numel() else None, lengths,
                int(pages.sum()), max(1, int(pages.max())), store.page)
    kept.seen.copy_(store.seen)
    return kept
