"""Learned attention sinks: kvfx's attention (rectangular and paged) scales
its output by the share of the softmax the sink logit leaves to the slots,
which must equal joining the sink to the scores and dropping it after."""

import torch

from kvfx.kernels.attention.reference import sink_weight, slot_attention_reference
from kvfx.kernels.paged_attention.reference import paged_attention_reference, paged_sink_weight
from kvfx.store import pack

NEG_INF = float("-inf")


def with_sink_column(q, k, v, bias, sinks, scale):
    """gpt-oss's eager attention: cat([scores, sink], -1) -> softmax -> drop the last column."""
    b, h, sq, _ = q.shape
    groups = h // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = q @ kk.transpose(-1, -2) * scale
    s = k.shape[2]
    causal = torch.zeros(sq, sq).masked_fill(~torch.ones(sq, sq, dtype=torch.bool).tril(), NEG_INF)
    full_bias = torch.cat([bias.repeat_interleave(groups, 1)[:, :, None].expand(b, h, sq, s - sq),
                           causal.expand(b, h, sq, sq)], -1)
    combined = torch.cat([logits + full_bias, sinks.view(1, h, 1, 1).expand(b, h, sq, 1)], -1)
    return combined.softmax(-1)[..., :-1] @ vv


def test_rectangular_sink_weight_equals_the_sink_column():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    bias, sinks = torch.randn(2, 2, 7), torch.randn(4) * 3
    got = slot_attention_reference(q, k, v, bias, 0.3) * sink_weight(q, k, bias, sinks.view(1, 4, 1), 0.3)
    torch.testing.assert_close(got, with_sink_column(q, k, v, bias, sinks, 0.3))


def test_paged_sink_weight_equals_the_rectangular_one():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    bias, sinks = torch.randn(2, 2, 9), torch.randn(1, 4, 1, 1)
    lengths = torch.full((2, 2), 9)
    store = pack(k, v, bias, torch.zeros_like(bias), lengths, 4 * 3, 3, 4)
    paged = paged_attention_reference(q, store.k_pages, store.v_pages, store.slot_bias, store.page_table, lengths,
                                      0.5) * paged_sink_weight(q, store.k_pages, store.slot_bias, store.page_table,
                                                               lengths, sinks, 0.5)
    rect = slot_attention_reference(q, k, v, bias[:, :, :8], 0.5) * sink_weight(q, k, bias[:, :, :8], sinks, 0.5)
    torch.testing.assert_close(paged, rect)
