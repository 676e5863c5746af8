"""kvfx's own cache layer for transformers caches: a slot store (``kvfx.store``)
in place of a full-attention layer's rectangular K/V.

``kvfx.compile`` puts a ``KvfxLayer`` in every empty full-attention layer of
the cache a call brings (``DynamicCache``, or ``StaticCache`` -- the
``cache_implementation="static"`` path of ``generate``), so its static buffers
are never allocated. The model calls ``cache.update(k, v, layer_idx)`` as
always; dynamo traces ``KvfxLayer.update``, which

  * on the first call marks the store's birth (``kvfx::store_mark``): the
    rewrite puts ``kvfx::store_compress`` after the layer's attention, and
    dynamo writes the new store into the layer's attributes;
  * on later calls appends the new tokens in place (plain tensor code,
    ``kvfx.store.append``, fused by the inner compiler) and tags what it hands
    the attention with the store (``kvfx::store_read``): the rewrite turns the
    layer's attention into ``kvfx::store_attend`` over the store.

Either way ``update`` hands back the new tokens' k, v only, and the layer
tells the mask builder that the cache is as long as the new tokens
(``get_mask_sizes``): the model's own mask and attention then see the new
tokens alone, which traces for any layer lengths, and kvfx replaces the
attention with its own, masked by the store's state. Between calls, on the
host and from shapes only, the layer makes room for the next call's tokens
(``reserve``): capacity grows by whole pages, a decode step never does.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin

from kvfx import store as slot_store
from kvfx.policies.budgets import cdiv

#: room a layer adds per row when it runs out and its final length is not
#: known (a static cache knows its own), as a fraction of the tokens seen (at
#: least one page): a growth copies the store, so growing by 1/32 of it costs
#: about 3% of a store copy per token, and the room held ahead is at most 3%.
GROW_FRACTION = 32


class CapacityError(RuntimeError):
    pass


class StoreUnreadable(RuntimeError):
    """A traced graph writes kvfx slot stores that no attention kvfx rewrites
    reads; ``kvfx.compile`` then puts the transformers layers back and runs
    the model on its own cache."""


class KvfxLayer(CacheLayerMixin):
    """One full-attention layer of a transformers cache, held as a kvfx slot store."""

    is_compileable = True     # static shapes between growths; generate builds a fixed-size mask outside the graph
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, page: int = slot_store.PAGE, max_length: int = -1) -> None:
        # Not CacheLayerMixin.__init__: ``keys``/``values`` are read-only views here.
        self.is_initialized = False
        self.page = page
        self.max_length = max_length        # the tokens it will hold: a static cache's length, generate's plan; -1: unknown
        self.extent = torch.empty(0, 0)      # [0, L]: rows' length for a continuous policy's step
        self.room = 0                        # free slots every row has at least (known on the host)
        self.tokens = 0                      # tokens absorbed (known on the host)
        self.uniform: Optional[int] = None   # the rows' common length, when a continuous policy keeps them equal
                                             # (ragged rows, Recompress(AdaKV): the mean per KV head)
        self.replaced = None                 # the empty transformers layer this one took the place of
        for name in slot_store.Store.FIELDS:
            setattr(self, name, None)

    def __repr__(self) -> str:
        state = f"{self.tokens} tokens in {self.k_pages.shape[0]} pages" if self.is_initialized else "empty"
        return f"KvfxLayer({state})"

    # -- what dynamo traces -----------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # the store is born in update
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not torch.compiler.is_compiling():
            if not self.is_initialized:  # e.g. a graph break before the cache write: dynamo runs it eagerly
                raise StoreUnreadable("the cache is written outside any compiled graph (dynamo ran that part of "
                                      "the model eagerly)")
            raise RuntimeError(
                "kvfx: a kvfx cache layer was called outside the kvfx-compiled graph (the model's own code ran "
                "eagerly: dynamo may have reached its recompile_limit, broken the graph before this layer's cache "
                "write on a decode step -- XLM slices its input by the cache length, a .item() --, or the model was "
                "called without kvfx.compile). Its store can only be read by kvfx's attention. Raise "
                "torch._dynamo.config.recompile_limit (TORCH_LOGS=recompiles,graph_breaks shows why), or use a fresh "
                "cache without kvfx.")
        if not self.is_initialized:
            (self.k_pages, self.v_pages, self.slot_bias, self.slot_score, self.page_table, self.lengths, self.pages,
             self.seen) = torch.ops.kvfx.store_mark(key_states, value_states, self.page)
            self.is_initialized = True
        else:
            slot_store.append(self.store, key_states, value_states)
            key_states, value_states = torch.ops.kvfx.store_read(key_states, value_states, *self.store.tensors(),
                                                                 self.extent)
        return key_states, value_states

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        """The mask the model builds covers the new tokens only: kvfx's attention
        masks the store itself. ``query``: the query length (transformers >= 5.2x)
        or the new tokens' cache positions (earlier 5.x)."""
        length = query if isinstance(query, int) else query.shape[0]
        return length, 0

    def get_seq_length(self):
        """Tokens absorbed: a 0-d tensor once filled, so positions computed from
        it in a compiled graph do not specialise on it."""
        return self.seen if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_length

    # transformers <= 5.2 names the abstract method get_max_cache_shape; later ones get_max_length.
    get_max_cache_shape = get_max_length

    # -- the host side, between calls ----------------------------------------------
    @property
    def store(self) -> slot_store.Store:
        return slot_store.Store(*(getattr(self, name) for name in slot_store.Store.FIELDS))

    def _set_store(self, store: slot_store.Store) -> None:
        for name, tensor in zip(slot_store.Store.FIELDS, store.tensors()):
            setattr(self, name, tensor)
        if self.extent.device != tensor.device:  # every input of the store's graphs on its device
            self.extent = torch.empty(0, self.extent.shape[1], device=tensor.device)
        # The page count and the table's width change at each growth: compile
        # the decode graph for any of them, so no growth ever recompiles it.
        for t in (store.k_pages, store.v_pages, store.slot_bias, store.slot_score):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(store.page_table, 2)
        if tensor.is_cuda:
            # CUDA graphs (mode="reduce-overhead") keep a static input in place
            # instead of copying it in each replay; unguarded, so that a growth
            # (new tensors) does not recompile.
            for t in (*store.tensors(), self.extent):
                torch._dynamo.mark_static_address(t, guard=False)

    def nbytes(self) -> int:
        """Bytes the layer holds: all its pages (used or not), their state and its tables."""
        return self.store.nbytes() if self.is_initialized else 0

    def reserve(self, new: int, policy, max_bytes: Optional[int] = None, used_elsewhere: int = 0) -> None:
        """Make room for ``new`` tokens in every row before a call, growing by
        whole pages when the rows may not have it: for a continuous policy
        (whose rows stop growing) just enough; up to the length the layer will
        hold when known (a static cache's, generate's plan); else
        1/GROW_FRACTION of the tokens seen. ``max_bytes``: refuse, before
        allocating, a store that would make the cache (``used_elsewhere`` + this
        layer) exceed it."""
        if not self.is_initialized:
            return
        if policy.ragged_rows and self.uniform is not None:
            self._fit_recompression(new, policy, max_bytes, used_elsewhere)
        if self.room >= new:
            return
        want = new - self.room
        if policy.schedule == "continuous":
            pass  # its rows return to their budget after every step
        elif self.max_length > 0:
            want = max(want, self.max_length - self.tokens)
        else:
            want = max(want, self.tokens // GROW_FRACTION)
        pages = cdiv(want, self.page)
        if max_bytes is not None:
            rows = self.page_table.shape[0] * self.page_table.shape[1]
            after = used_elsewhere + self.nbytes() + rows * pages * (self._page_bytes() + 8)   # + the page table
            if after > max_bytes:
                raise CapacityError(
                    f"kvfx: max_cache_bytes={max_bytes:,} would be exceeded: the cache would hold {after:,} bytes after "
                    f"making room for {new} more token(s) ({pages} more page(s) of {self.page} slots for each of "
                    f"{rows} (batch, KV head) rows). Raise max_cache_bytes, or generate fewer tokens.")
        self._set_store(slot_store.grow(self.store, pages))
        self.room += pages * self.page

    def _page_bytes(self) -> int:
        """Bytes one page of the store holds: its slots' K, V and per-slot state."""
        store = self.store
        return store.page * (store.k_pages[0, 0].nbytes + store.v_pages[0, 0].nbytes + store.state_bytes_per_slot)

    def _recompressed_length(self, new: int, policy) -> Optional[int]:
        """The mean a head holds after a call of ``new`` tokens that recompresses
        rows holding their own counts; None when the call does not."""
        after = policy.decode_length(self.uniform + new, new)
        return after if after < self.uniform + new else None

    def _ragged_bounds(self, after: int, policy) -> tuple[int, int]:
        """(pool pages, table width) that rows holding their own counts need
        after a recompression to a mean of ``after`` slots per KV head, each
        row paged for its kept slots + ``policy.room_after(after)``: a batch
        row's heads hold ``Hkv x after`` slots, each wastes under a page, and
        one head may hold them all."""
        batch, kv_heads = self.page_table.shape[:2]
        room = policy.room_after(after)
        per_row = (kv_heads * (after + room) + kv_heads * (self.page - 1)) // self.page
        return batch * per_row, cdiv(kv_heads * after + room, self.page)

    def _fit_recompression(self, new: int, policy, max_bytes, used_elsewhere: int) -> None:
        """Before a call that recompresses rows holding their own counts (the
        step repages them in place, within the pool and table it finds),
        make the pool and table large enough."""
        after = self._recompressed_length(new, policy)
        if after is None:
            return
        pages, width = self._ragged_bounds(after, policy)
        pages, width = max(pages, self.k_pages.shape[0]), max(width, self.page_table.shape[2])
        if (pages, width) == (self.k_pages.shape[0], self.page_table.shape[2]):
            return
        if max_bytes is not None:
            rows = self.page_table.shape[0] * self.page_table.shape[1]
            after_bytes = (used_elsewhere + self.nbytes() + (pages - self.k_pages.shape[0]) * self._page_bytes()
                           + rows * (width - self.page_table.shape[2]) * 8)
            if after_bytes > max_bytes:
                raise CapacityError(
                    f"kvfx: max_cache_bytes={max_bytes:,} would be exceeded: the cache would hold {after_bytes:,} "
                    f"bytes while recompressing (a pool of {pages} pages of {self.page} slots). Raise max_cache_bytes.")
        self._set_store(slot_store.resize(self.store, pages, width))

    def advance(self, new: int, policy, first: bool, prompt_slots: Optional[int] = None) -> None:
        """Account for a call that brought ``new`` tokens. After the ``first``
        call (the store's birth, sized exactly: no room), ``prompt_slots`` is the
        rows' common length when a continuous policy keeps them equal."""
        if first:
            self.tokens, self.room, self.uniform = new, 0, prompt_slots
            return
        self.tokens += new
        if policy.schedule == "continuous" and self.uniform is not None:
            recompressed = self._recompressed_length(new, policy) if policy.ragged_rows else None
            if recompressed is not None:
                # The step repaged every row for room_after(...) more slots:
                # the pool it sized for that (or a larger one) comes back to it.
                self.room = policy.room_after(recompressed)
                pages, _ = self._ragged_bounds(recompressed, policy)
                if self.k_pages.shape[0] > pages:
                    self._set_store(slot_store.resize(self.store, pages, self.page_table.shape[2]))
                self.uniform = recompressed
            else:
                after = policy.decode_length(self.uniform + new, new)
                self.room -= after - self.uniform
                self.uniform = after
        else:
            self.room -= new

    def prepare_step(self, new: int, policy) -> None:
        """Before a call: the row length a continuous policy's step will see."""
        if policy.schedule == "continuous" and self.uniform is not None and self.extent.shape[1] != self.uniform + new:
            self.extent = torch.empty(0, self.uniform + new, device=self.k_pages.device)

    # -- views (copies) for inspection and tests ------------------------------------
    def dense(self):
        """(keys, values, slot_bias, slot_score) of every row as rectangles as long
        as the longest row: rows pad with zeros (bias -inf). A copy."""
        return slot_store.dense(self.store)

    @property
    def keys(self) -> Optional[torch.Tensor]:
        return self.dense()[0] if self.is_initialized else None

    @keys.setter
    def keys(self, value) -> None:
        _refuse_edit()

    @property
    def values(self) -> Optional[torch.Tensor]:
        return self.dense()[1] if self.is_initialized else None

    @values.setter
    def values(self, value) -> None:
        _refuse_edit()

    # -- cache edits ---------------------------------------------------------------
    def _rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self._set_store(slot_store.select_rows(self.store, index.to(self.k_pages.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            rows = torch.arange(self.page_table.shape[0], device=self.k_pages.device)[indices]
            self._rows(rows)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows(torch.arange(self.page_table.shape[0], device=self.k_pages.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "kvfx: crop() on a compressed cache is not supported: its slots are no longer one per token, so "
            "removing the last N tokens (assisted or speculative decoding, DoLa) has no defined meaning. "
            "Generate without assistant_model / prompt lookup, or without kvfx.")

    def reset(self) -> None:
        self.__init__(self.page, self.max_length)

    def offload(self) -> None:
        raise ValueError("kvfx: offloading a kvfx cache layer is not supported (its store stays on its device)")

    def prefetch(self) -> None:
        pass


def _refuse_edit() -> None:
    raise AttributeError(
        "kvfx: this layer's keys and values live in kvfx's slot store (pages, per-row lengths, slot bias): "
        "they cannot be replaced from outside. keys/values read a copy of the kept slots; kvfx follows "
        "reorder_cache, batch_select_indices and batch_repeat_interleave (beam search works).")


#: transformers layer classes kvfx replaces when empty: full attention, K/V as rectangles
REPLACEABLE = ("DynamicLayer", "StaticLayer")


def _length_if_full(layer, planned: int) -> Optional[int]:
    """The tokens an empty layer will hold when it attends to every token it
    holds (-1: unknown), else None. A sliding-window layer whose window never
    binds within the tokens planned is such a layer: kvfx compresses it inside
    the window (a window that binds already bounds the cache)."""
    if getattr(layer, "is_initialized", True):  # (a linear-attention or SSM layer has no such flag)
        return None
    kind = type(layer).__name__
    if kind in REPLACEABLE:
        return getattr(layer, "max_cache_len", planned)
    if kind == "DynamicSlidingWindowLayer" and 0 < planned <= layer.sliding_window:
        return planned
    if kind == "StaticSlidingWindowLayer" and getattr(layer, "_is_croppable", False):  # max_cache_len <= window
        return layer.max_cache_len
    return None


def uninstall(cache, fresh: list[int]) -> None:
    """Put back the empty layers ``install`` replaced at the indices ``fresh``
    (kvfx layers that were empty when the failed call began: whatever they
    hold now came from that call)."""
    layers = getattr(cache, "layers", None)
    for i in fresh:
        if isinstance(layers[i], KvfxLayer) and layers[i].replaced is not None:
            layers[i] = layers[i].replaced


def install(cache, page: int = slot_store.PAGE, planned: int = -1) -> list[tuple[int, KvfxLayer]]:
    """Put a KvfxLayer in every empty full-attention layer of ``cache``; returns
    all its kvfx layers with their index. A layer grows to a static cache's
    length, or to ``planned`` tokens (what ``generate`` will feed), at once."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return []
    for i, layer in enumerate(layers):
        length = _length_if_full(layer, planned)
        if length is not None:
            layers[i] = KvfxLayer(page, length)
            layers[i].replaced = layer
    return [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, KvfxLayer)]
