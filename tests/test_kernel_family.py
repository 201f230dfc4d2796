"""The report names the kernel family each int8 conv / linear runs on, and why, for the CPU it runs on."""
import torch
from torch import nn

import qcompile
from qcompile.backends.x86.kernel_choice import cpu_has_avx512_vnni


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_default_engine_names_torchs_family_rule_for_this_cpu():
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]
    art = qcompile.compile(_model(), (cal[0],), backend="x86", calibration=cal, quantize_outputs=True,
                           backend_options={"engine": "x86"})
    rows = {r.name: r.kernel for r in art.report.rows if r.status == "int8" and r.op in ("conv2d", "linear")}
    convs = [k for n, k in rows.items() if n.startswith("conv")]
    linears = [k for n, k in rows.items() if n.startswith("linear")]
    assert len(convs) == 2 and len(linears) == 2
    assert all("(fbgemm: torch's x86 engine packs every int8 linear" in k for k in linears)
    expected = "(onednn:" if cpu_has_avx512_vnni() else "(fbgemm:"  # symmetric weights, groups <= 100
    assert all(expected in k for k in convs), convs


def test_explicit_engine_is_named_as_chosen():
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]
    art = qcompile.compile(_model(), (cal[0],), backend="x86", calibration=cal, backend_options={"engine": "fbgemm"})
    kernels = [r.kernel for r in art.report.rows if r.status == "int8" and r.op in ("conv2d", "linear")]
    assert kernels and all("(fbgemm: engine='fbgemm'" in k for k in kernels)
