"""The slot store: kvfx's own storage for one compressed layer (DESIGN.md §8).

Keys and values live in pages of ``page`` slots shared by all (batch, KV head)
rows of the layer; each row owns a list of pages (its page table) and a
length, so a row holds its own number of slots -- a retrieval head all of
them, another head a handful -- and the layer costs the sum over its rows,
never its longest row times the row count. The per-slot state (attention
bias, running score) lives in pages beside the keys. Nothing here reads a
device tensor on the host: every size is computed from shapes, so a decode
step never synchronises and its shapes stay fixed until the next growth.

Tensors of a store (``Store``), with R = B * Hkv rows and N pages:
  k_pages [N, P, D], v_pages [N, P, Dv]   keys and values
  slot_bias [N, P] float32                added to the attention logit (-inf: invalid, log(count): merged)
  slot_score [N, P] float32               running score, for continuous policies only ([0, P] for the others)
  page_table [B, Hkv, M] int64            page ids of each row, in slot order (unused entries: 0)
  lengths [B, Hkv] int64                  slots each row holds
  pages [B, Hkv] int64                    pages each row owns (its capacity is pages * P)
  seen [] int64                           tokens the layer has absorbed (positions follow it)
"""

from __future__ import annotations

import dataclasses
import torch

from kvfx.policies.budgets import cdiv

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


def _table(pages: torch.Tensor, start: torch.Tensor, width) -> torch.Tensor:
    """[R, width] page table: row r owns pages start[r] .. start[r] + pages[r] - 1."""
    j = torch.arange(width, device=pages.device)
    return torch.where(j < pages[:, None], start[:, None] + j, 0)


def pack(k, v, slot_bias, slot_score, lengths, n_pages, width, page: int = PAGE) -> Store:
    """A store holding the first ``lengths`` [B, Hkv] slots of each row of the
    rectangular k/v [B, Hkv, W, D] (and their bias, score [B, Hkv, W]; score
    None: the store keeps none), in ``n_pages`` pages with a ``width``-page
    table. Rows take pages in row order; pages beyond what the rows need stay
    empty (bias -inf)."""
    b, hkv, w, d = k.shape
    rows = b * hkv
    length = lengths.reshape(rows)
    pages = cdiv(length, page)
    owner, j, start = _page_owners(pages, n_pages)
    slot = (j[:, None] * page + torch.arange(page, device=k.device)).clamp(min=0)     # [N, P] slot within its row
    valid = (owner[:, None] < rows) & (slot < length[owner.clamp(max=rows - 1)][:, None])
    src = owner.clamp(max=rows - 1)[:, None] * w + slot.clamp(max=w - 1)               # into the flattened rows
    src = torch.where(valid, src, 0)

    def take(x, fill):
        flat = x.reshape(rows * w, *x.shape[3:])
        out = flat[src]
        mask = valid.view(*valid.shape, *([1] * (out.dim() - 2)))
        return torch.where(mask, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))

    scores = take(slot_score.float(), 0.0) if slot_score is not None else slot_bias.new_empty(0, page)
    return Store(
        k_pages=take(k, 0).contiguous(), v_pages=take(v, 0).contiguous(),
        slot_bias=take(slot_bias.float(), NEG_INF).contiguous(), slot_score=scores.float().contiguous(),
        page_table=_table(pages, start, width).view(b, hkv, width).contiguous(),
        lengths=lengths.to(torch.int64).contiguous(), pages=pages.view(b, hkv).contiguous(),
        seen=torch.zeros((), dtype=torch.int64, device=k.device))


def _flat_slots(store: Store, slots: torch.Tensor) -> torch.Tensor:
    """Pool-wide slot index (page * P + offset) of row-relative ``slots`` [B, Hkv, n]."""
    p = store.page
    page = store.page_table.gather(2, slots // p)
    return page * p + slots % p


def append(store: Store, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Write the new tokens' k/v [B, Hkv, q, D] after each row's slots, in place
    (bias 0, score 0), and count them. Every row must have room (``grow``)."""
    q = k_new.shape[2]
    slots = store.lengths[..., None] + torch.arange(q, device=k_new.device)
    flat = _flat_slots(store, slots).reshape(-1)
    store.k_pages.view(-1, store.k_pages.shape[-1]).index_copy_(0, flat, k_new.reshape(-1, k_new.shape[-1]))
    store.v_pages.view(-1, store.v_pages.shape[-1]).index_copy_(0, flat, v_new.reshape(-1, v_new.shape[-1]))
    store.slot_bias.view(-1).index_fill_(0, flat, 0.0)
    if store.slot_score.numel():
        store.slot_score.view(-1).index_fill_(0, flat, 0.0)
    store.lengths.add_(q)
    store.seen.add_(q)


def gather(store: Store, width: int):
    """The first ``width`` slots of every row as rectangles: k, v [B, Hkv, width, D],
    slot_bias (-inf past a row's length), slot_score [B, Hkv, width]."""
    p = store.page
    n = cdiv(width, p)
    table = store.page_table[:, :, :n]
    b, hkv = table.shape[:2]

    def take(x):
        return x[table].reshape(b, hkv, n * p, *x.shape[2:])[:, :, :width]

    valid = torch.arange(width, device=table.device) < store.lengths[..., None]
    bias = take(store.slot_bias).masked_fill(~valid, NEG_INF)
    score = take(store.slot_score) if store.slot_score.numel() else torch.zeros_like(bias)
    return take(store.k_pages), take(store.v_pages), bias, score


def scatter(store: Store, k, v, slot_bias, slot_score) -> None:
    """Overwrite every row with the rectangles k, v [B, Hkv, n, D], slot_bias,
    slot_score [B, Hkv, n] (n slots each, within the rows' pages), in place."""
    n = k.shape[2]
    slots = torch.arange(n, device=k.device).expand(*k.shape[:2], n)
    flat = _flat_slots(store, slots).reshape(-1)
    store.k_pages.view(-1, k.shape[-1]).index_copy_(0, flat, k.reshape(-1, k.shape[-1]))
    store.v_pages.view(-1, v.shape[-1]).index_copy_(0, flat, v.reshape(-1, v.shape[-1]))
    store.slot_bias.view(-1).index_copy_(0, flat, slot_bias.float().reshape(-1))
    if store.slot_score.numel():
        store.slot_score.view(-1).index_copy_(0, flat, slot_score.float().reshape(-1))
    store.lengths.fill_(n)


def grow(store: Store, new_pages: int) -> Store:
    """A store with ``new_pages`` more pages for every row (appended to each
    row's page table), the old pages copied. Sizes come from shapes only."""
    b, hkv, m = store.page_table.shape
    rows = b * hkv
    n = store.k_pages.shape[0]
    device = store.k_pages.device

    def more(x, fill):
        if not x.numel():
            return x  # a state the store does not keep
        extra = torch.full((rows * new_pages, *x.shape[1:]), fill, dtype=x.dtype, device=device)
        return torch.cat([x, extra])

    ids = n + torch.arange(rows * new_pages, device=device).view(b, hkv, new_pages)
    table = torch.cat([store.page_table, torch.zeros(b, hkv, new_pages, dtype=torch.int64, device=device)], 2)
    table.scatter_(2, store.pages[..., None] + torch.arange(new_pages, device=device), ids)
    return Store(more(store.k_pages, 0), more(store.v_pages, 0), more(store.slot_bias, NEG_INF),
                 more(store.slot_score, 0.0), table, store.lengths.clone(), store.pages + new_pages, store.seen.clone())


def select_rows(store: Store, index: torch.Tensor) -> Store:
    """A store whose batch rows are ``index`` [B'] of this one's (beam search
    reorders, generation utilities repeat or select rows); each kept row gets
    its own copy of its pages. Allocates exactly the pages the rows own, which
    is read on the host once: this runs between decode steps, not in one."""
    table, pages, lengths = store.page_table[index], store.pages[index], store.lengths[index]
    b, hkv, m = table.shape
    flat_pages = pages.reshape(-1)
    n = int(flat_pages.sum())
    owner, j, start = _page_owners(flat_pages, n)
    old = table.reshape(b * hkv, m)[owner.clamp(max=b * hkv - 1), j.clamp(min=0, max=m - 1)]
    score = store.slot_score[old].contiguous() if store.slot_score.numel() else store.slot_score
    return Store(store.k_pages[old].contiguous(), store.v_pages[old].contiguous(), store.slot_bias[old].contiguous(),
                 score, _table(flat_pages, start, m).view(b, hkv, m),
                 lengths.contiguous(), pages.contiguous(), store.seen.clone())


def dense(store: Store):
    """Every row's slots as rectangles as wide as the longest row (for
    inspection and tests: a copy). Reads the longest length on the host."""
    width = int(store.lengths.max()) if store.lengths.numel() else 0
    return gather(store, width)
