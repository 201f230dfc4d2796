"""ONNX backend on ops the old hand-written ATen->ONNX table stopped at ("no ONNX mapping for node ..."):
each model compiles through torch.onnx.export, ORT matches the reference graph, the linears / convs run as
integer kernels and the new op is a named float fallback, not a failure."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import annotation as A

ort = pytest.importorskip("onnxruntime")
from qcompile.backends.onnx.runtime import INT_KERNELS  # noqa: E402

warnings.filterwarnings("ignore")


class SameStem(nn.Module):
    """TF-style 'same' padding (explicit pad), in-place SiLU and dropout left in an eval-mode graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.act, self.drop = nn.SiLU(inplace=True), nn.Dropout(0.1, inplace=True)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.drop(self.act(self.conv(F.pad(x, (0, 1, 0, 1))))))


class Unflatten(nn.Module):
    """ViT-style patch tokens: flatten -> linear -> unflatten into heads."""

    def __init__(self):
        super().__init__()
        self.patch, self.proj = nn.Conv2d(3, 16, 4, stride=4), nn.Linear(16, 16)

    def forward(self, x):
        t = self.proj(self.patch(x).flatten(2).transpose(1, 2))
        return t.unflatten(-1, (4, 4)).sum(-1)


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 32), nn.Linear(16, 8)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.out(a * torch.sigmoid(b))


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.cumsum(self.fc(x), dim=1)


class Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.head = nn.Linear(16, 16), nn.LSTM(16, 16, batch_first=True), nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0])


class Unfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(F.unfold(self.conv(x), kernel_size=2, stride=2).transpose(1, 2))


class VectorNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.fc(x)
        return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)


class Sdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, 2, 8).transpose(1, 2) for m in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))


IMAGE, TOKENS = (3, 16, 16), (6, 16)
CASES = {  # model, input shape without batch, op kinds that must be reported (fallback or int8, never missing)
    "pad_silu_dropout": (SameStem, IMAGE, "pad"),
    "unflatten": (Unflatten, IMAGE, "unflatten"),
    "chunk": (Chunk, TOKENS, "chunk"),
    "cumsum": (Cumsum, TOKENS, "cumsum"),
    "lstm": (Lstm, TOKENS, "lstm"),
    "im2col": (Unfold, IMAGE, "im2col"),
    "linalg_vector_norm": (VectorNorm, TOKENS, "linalg_vector_norm"),
    "scaled_dot_product_attention": (Sdpa, TOKENS, "scaled_dot_product_attention"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_compiles_for_onnx_and_matches_the_reference(case):
    cls, shape, op = CASES[case]
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, *shape, generator=g) for _ in range(3)]
    art = qcompile.compile(model, (calib[0],), backend="onnx", calibration=calib, progress=False)
    v = art.report.verify
    # ORT vs the reference graph: float rounding only (measured >= 60 dB on every case)
    assert v["sqnr_vs_reference_db"] > 40 and v["within_one_step"] >= 0.99, v
    assert v["sqnr_vs_float_db"] > 20, v
    rows = art.report.rows
    gemms = [r for r in rows if r.op in ("linear", "conv2d") and r.status == A.INT8]
    assert gemms and all(r.kernel in INT_KERNELS for r in gemms), [(r.name, r.kernel) for r in gemms]
    if case == "scaled_dot_product_attention":  # written out (passes/decompose_sdpa.py): Q.K^T and P.V run int8
        assert not any(op in r.op for r in rows)
        mm = [r for r in rows if r.op == "matmul"]
        assert [r.kernel for r in mm] == ["MatMulIntegerToFloat", "QLinearMatMul"], [(r.name, r.kernel) for r in mm]
    else:
        named = [r for r in rows if op in r.op or op in r.name]
        assert named and all(r.status != A.INT8 and r.reason for r in named), [(r.name, r.status) for r in named]
    assert v["dynamic_batch"]
    bigger = torch.randn(5, *shape, generator=g)  # the symbolic batch runs
    torch.testing.assert_close(art(bigger), art.run_reference(bigger), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode,weights,ops", [
    ("dynamic", None, {"dynamic_quantize", "matmul_integer"}),
    ("weight_only", qcompile.WeightSpec(bits=4, group_size=32, symmetric=False), {"matmul_nbits", "embedding_rows"}),
    ("weight_only", qcompile.WeightSpec(dtype="nf4", group_size=64), {"matmul_bnb4", "embedding_rows"}),
], ids=["dynamic", "int4", "nf4"])
def test_pre_export_graph_computes_the_reference(mode, weights, ops):
    """The pre-export pass's qcompile_onnx ops (what torch.onnx translates into DynamicQuantizeLinear /
    MatMulInteger / MatMulNBits / MatMulBnb4 / Gather) compute the reference graph's numbers in eager mode."""
    import _zoo as zoo
    from qcompile.backends.onnx.prepare import prepare
    from qcompile.qparams import sqnr
    model = zoo.make_bert_encoder(seed=0, hidden=64, layers=1, heads=2, intermediate=128)
    ex = zoo._bert_inputs(batch=2, seq=16)
    art = qcompile.compile(model, ex, backend="onnx", mode=mode, weights=weights, verify=False, progress=False)
    prep = prepare(art.reference)
    found = {n.target.name().split("::")[1] for n in prep.gm.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "name") and "qcompile_onnx" in n.target.name()}
    assert ops <= found, found
    with torch.no_grad():
        assert sqnr(art.run_reference(*ex), prep.gm(*ex)) > 100
    assert not any("qcompile_onnx" in str(n.target) for n in art.reference.graph.nodes)  # reference untouched
