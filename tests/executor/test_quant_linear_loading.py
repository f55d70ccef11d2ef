"""The linear layers load a quantization scheme's parameters by their axis tags: a transposed, packed
weight and its group scales land in the right place for fused q/k/v and gate/up layers and for each
tensor-parallel rank, and a per-shard scale keeps one entry per fused shard."""

from __future__ import annotations

import pytest
import torch

from radixserve.executor import parallel_state, quantization
from radixserve.executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from radixserve.executor.quantization.base import LinearMethod, QuantConfig, new_param, tag

PACK = 2  # "packed" output features per element: the weight is stored [in, out / PACK, PACK]
GROUP = 4  # input features per scale


class _TransposedPacked(LinearMethod):
    """A stand-in scheme laid out like AWQ: weight [in, out/PACK, PACK] (output on axis 1, packed),
    scales [in/GROUP, out] (input grouped on axis 0), and one scalar per fused shard."""

    def create_weights(self, layer, in_features, out_features, params_dtype):
        layer.register_parameter(
            "qweight",
            tag(
                new_param(in_features, out_features // PACK, PACK),
                output_dim=1,
                input_dim=0,
                output_div=PACK,
            ),
        )
        layer.register_parameter(
            "scales",
            tag(
                new_param(in_features // GROUP, out_features),
                output_dim=1,
                input_dim=0,
                input_div=GROUP,
            ),
        )
        layer.register_parameter(
            "shard_scale", tag(new_param(3), output_dim=None, input_dim=None, per_shard=True)
        )

    def dense(self, layer) -> torch.Tensor:
        """The [out, in] weight the stored values stand for."""
        w = layer.qweight.reshape(layer.qweight.shape[0], -1).t()
        return w * layer.scales.repeat_interleave(GROUP, 0).t()

    def apply(self, layer, x, bias):
        return x @ self.dense(layer).t()


class _Config(QuantConfig):
    def linear_method(self):
        return _TransposedPacked()


@pytest.fixture
def tp(monkeypatch):
    def set_rank(rank: int, size: int):
        monkeypatch.setattr(parallel_state._state, "rank", rank)
        monkeypatch.setattr(parallel_state._state, "size", size)

    set_rank(0, 1)
    return set_rank


def _build(factory):
    with quantization.building_with(_Config()):
        return factory()


def _checkpoint(out_features: int, in_features: int, seed: int):
    """One checkpoint tensor pair in the scheme's layout and the dense [out, in] weight it means."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(in_features, out_features, generator=g)
    s = torch.rand(in_features // GROUP, out_features, generator=g) + 0.5
    dense = (q * s.repeat_interleave(GROUP, 0)).t()
    return q.reshape(in_features, out_features // PACK, PACK), s, dense


def _load(layer, shard_id, q, s, scalar):
    for name, value in (("qweight", q), ("scales", s), ("shard_scale", scalar)):
        param = getattr(layer, name)
        if shard_id is None:
            param.weight_loader(param, value)
        else:
            param.weight_loader(param, value, shard_id)


@pytest.mark.parametrize("rank", [0, 1])
def test_fused_qkv_shards_by_the_tags_on_each_rank(tp, rank):
    tp(rank, 2)
    heads, kv_heads, d, hidden = 4, 2, 4, 8
    layer = _build(lambda: QKVParallelLinear(hidden, d, heads, kv_heads))
    full = {}
    for i, shard in enumerate("qkv"):
        rows = (heads if shard == "q" else kv_heads) * d
        q, s, dense = _checkpoint(rows, hidden, seed=i)
        _load(layer, shard, q, s, torch.tensor(float(i + 1)))
        full[shard] = dense
    per_rank = {"q": heads * d // 2, "k": kv_heads * d // 2, "v": kv_heads * d // 2}
    expected = torch.cat([full[sh][rank * n : (rank + 1) * n] for sh, n in per_rank.items()])
    torch.testing.assert_close(layer.quant.dense(layer), expected)
    assert layer.shard_scale.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("rank", [0, 1])
def test_merged_column_and_row_parallel_slices(tp, rank):
    tp(rank, 2)
    gate_up = _build(lambda: MergedColumnParallelLinear(8, [16, 16]))
    parts = [_checkpoint(16, 8, seed=10 + i) for i in range(2)]
    for i, (q, s, _) in enumerate(parts):
        _load(gate_up, i, q, s, torch.tensor(0.0))
    expected = torch.cat([dense[rank * 8 : (rank + 1) * 8] for _, _, dense in parts])
    torch.testing.assert_close(gate_up.quant.dense(gate_up), expected)

    down = _build(lambda: RowParallelLinear(16, 8))
    q, s, dense = _checkpoint(8, 16, seed=20)
    for name, value in (("qweight", q), ("scales", s)):
        getattr(down, name).weight_loader(getattr(down, name), value)
    torch.testing.assert_close(down.quant.dense(down), dense[:, rank * 8 : (rank + 1) * 8])


def test_plain_layers_still_shard_their_weight(tp):
    tp(1, 2)
    col = ColumnParallelLinear(4, 8, bias=True)
    w, b = torch.arange(32.0).reshape(8, 4), torch.arange(8.0)
    col.weight.weight_loader(col.weight, w)
    col.bias.weight_loader(col.bias, b)
    torch.testing.assert_close(col.weight.data, w[4:])
    torch.testing.assert_close(col.bias.data, b[4:])
    row = RowParallelLinear(8, 4, bias=True)
    row.weight.weight_loader(row.weight, w.t().contiguous())
    row.bias.weight_loader(row.bias, b[:4])
    torch.testing.assert_close(row.weight.data, w.t()[:, 4:])
    torch.testing.assert_close(row.bias.data, b[:4])  # added once after the all-reduce: whole


def test_dummy_full_shapes_follow_the_output_axis(tp):
    tp(0, 2)
    layer = _build(lambda: QKVParallelLinear(8, 4, 4, 2))
    assert layer.full_shape(layer.qweight) == (8, (4 + 2 * 2) * 4 // PACK, PACK)
    assert layer.full_shape(layer.scales) == (2, (4 + 2 * 2) * 4)
