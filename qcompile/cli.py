"""Command line: ``qcompile demo [--backend x86] [--model resnet18]`` compiles a zoo model and prints its report."""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def demo(backend: str, model_name: str, html: str | None) -> int:
    import qcompile
    from qcompile import zoo
    from qcompile.qparams import sqnr
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if model_name == "resnet18":
        model = zoo.resnet18_shaped().eval()
        g = torch.Generator().manual_seed(1)
        calib = [torch.randn(2, 3, 112, 112, generator=g) for _ in range(4)]
        example = (torch.randn(2, 3, 112, 112, generator=g),)
    else:
        model, example = zoo.get_model(model_name)
        calib = [example] * 4
    print(qcompile.explain(model, example, backend=backend).summary(), "(predicted before calibration)\n")
    art = qcompile.compile(model, example, backend=backend, calibration=calib)
    print(art.report)
    with torch.no_grad():
        print(f"\nSQNR of {backend} int8 output vs float: {sqnr(model(*example), art(*example)):.1f} dB")
    if html:
        art.report.to_html(html)
        print(f"HTML report written to {html}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qcompile")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a zoo model and print its coverage report")
    d.add_argument("--backend", default="x86")
    d.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2", "bert_encoder", "digits_cnn"])
    d.add_argument("--html", default=None, help="also write the HTML report here")
    args = ap.parse_args(argv)
    return demo(args.backend, args.model, args.html)


if __name__ == "__main__":
    sys.exit(main())
