"""After calibration: held-out verification as a distribution, per-layer SQNR against float, activation
histograms with their chosen ranges, and calibration health (too small, too clean, outlier channels)."""
from __future__ import annotations

import contextlib
import statistics

import torch

from .monitor import clip_stats, quant_points, record_points
from .qparams import sqnr

MOVING = 0.05        # a range that grew > 5 % over the second half of the calibration data is still moving
MOVING_SHARE = 0.25  # ... in more than a quarter of the tensors: the data is too small
CLEAN_SHARE = 1e-3   # held-out data clipping > 0.1 % of a tensor's elements ...
CLEAN_TENSORS = 0.25  # ... in more than a quarter of the tensors: the data is too clean
OUTLIER = 8.0        # a channel whose abs-max is > 8x the median channel's
MAX_HOLDOUT = 4
HIST_BINS = 48


def split_holdout(calibration, verify_data):
    """(calibration, verification samples, source): ``verify_data`` when given, else the tail of a calibration
    list of >= 8 samples (1/8 of it, at most MAX_HOLDOUT samples), which is then NOT calibrated on: a sample
    the observers saw cannot show whether the ranges generalise."""
    if verify_data is not None:
        return calibration, list(verify_data), "verify_data"
    if isinstance(calibration, (list, tuple)) and len(calibration) >= 8:
        k = min(MAX_HOLDOUT, len(calibration) // 8)
        return (list(calibration[:-k]), list(calibration[-k:]),
                f"calibration tail ({k} samples held out of {len(calibration)}: not calibrated on)")
    return calibration, [], "example inputs only (give verify_data= or >= 8 calibration samples)"


# -- ranges while calibrating -------------------------------------------------------------------------
def install_range_tracking(gm) -> tuple[dict, list]:
    """Record every per-tensor activation observer's (min, max) after each sample it sees:
    ({tensor name: [(min, max), ...]}, hook handles)."""
    from .observers import Observer
    seen: dict[str, list] = {}
    handles = []
    observed = {n.target: n.args[0].name for n in (gm.graph.nodes if gm is not None else ())
                if n.op == "call_module" and n.args and hasattr(n.args[0], "name")}
    for name, mod in (gm.named_modules() if gm is not None else []):
        if isinstance(mod, Observer) and hasattr(mod, "min_val"):
            def hook(m, _inp, _out, key=observed.get(name, name)):
                if m.min_val is not None and m.min_val.numel() == 1:
                    seen.setdefault(key, []).append((float(m.min_val), float(m.max_val)))
            handles.append(mod.register_forward_hook(hook))
    return seen, handles


@contextlib.contextmanager
def track_ranges(prepared):
    """install_range_tracking for the duration of a with-block."""
    seen, handles = install_range_tracking(getattr(prepared, "gm", None))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def moving_ranges(seen: dict) -> dict:
    """Observers whose range grew by more than MOVING between half and all of the samples."""
    growth = {}
    for name, traj in seen.items():
        if len(traj) < 2:
            continue
        lo_h, hi_h = traj[len(traj) // 2 - 1] if len(traj) > 2 else traj[0]
        lo, hi = traj[-1]
        full = hi - lo
        if full > 0:
            growth[name] = ((hi - lo) - (hi_h - lo_h)) / full
    return growth


# -- held-out verification ------------------------------------------------------------------------------
def _as_inputs(sample, ctx, index: int, names):
    """A held-out sample as (args, kwargs), checked like a calibration sample (qcompile.validate)."""
    from .validate import check_sample, sample_to_inputs
    args, kwargs = sample_to_inputs(sample, ctx.inputs, index, names)
    check_sample(args, kwargs, ctx.inputs, index, what="verify_data / held-out sample")
    return args, kwargs


def _flat(out) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def verify_batch(art, float_gm, args, kwargs) -> dict:
    """Output SQNR of the artifact vs float and vs the reference, and the share within one step."""
    from .ir import output_steps
    ref, low = _flat(art.run_reference(*args, **kwargs)), _flat(art(*args, **kwargs))
    steps = output_steps(art.reference)
    within = []
    for i, (r, lo) in enumerate(zip(ref, low)):
        step = steps[i] if i < len(steps) and steps[i] else max((r.max() - r.min()).item() / 255, 1e-12)
        within.append(((r.float() - lo.float()).abs() <= step * 1.001 + 1e-6).float().mean().item())
    out = {"within_one_step": min(within), "sqnr_vs_reference_db": min(sqnr(r, lo) for r, lo in zip(ref, low))}
    if float_gm is not None:
        flo = _flat(float_gm(*args, **kwargs))
        out["sqnr_vs_float_db"] = min(sqnr(f, lo) for f, lo in zip(flo, low))
    return out


def distribution(per_batch: list[dict]) -> dict:
    keys = [k for k in per_batch[0] if isinstance(per_batch[0][k], float)] if per_batch else []
    out = {}
    for k in keys:
        vals = [b[k] for b in per_batch if k in b]
        out[f"{k}_min"] = round(min(vals), 4)
        out[f"{k}_median"] = round(statistics.median(vals), 4)
    return out


# -- activations: histograms, clipping, outlier channels ----------------------------------------------------
def histogram(x: torch.Tensor, p, bins: int = HIST_BINS) -> dict:
    x = x.detach().float().flatten()
    x0, x1 = min(x.min().item(), p.lo), max(x.max().item(), p.hi)
    counts = torch.histc(x, bins=bins, min=x0, max=x1 if x1 > x0 else x0 + 1e-6)
    st = clip_stats(x, p)
    return {"tensor": p.value, "module": p.module, "lo": p.lo, "hi": p.hi, "x0": x0, "x1": x1,
            "counts": [int(c) for c in counts.tolist()], "clipped_share": st["clipped"] / max(1, st["elements"]),
            "excursion": round(st["excursion"], 4)}


def outlier_channels(x: torch.Tensor, name: str, module: str) -> dict | None:
    """Channels (dim 1 of NCHW, else the last dim) whose abs-max is > OUTLIER x the median channel's."""
    if x.dim() < 2:
        return None
    dim = 1 if x.dim() == 4 else x.dim() - 1
    amax = x.detach().float().abs().transpose(0, dim).reshape(x.shape[dim], -1).amax(1)
    if amax.numel() < 8:
        return None
    med = amax.median().item()
    if med <= 0:
        return None
    ratio = amax / med
    idx = torch.nonzero(ratio > OUTLIER).flatten()
    if not len(idx):
        return None
    order = idx[ratio[idx].argsort(descending=True)]
    return {"tensor": name, "module": module, "channels": order[:10].tolist(),
            "times_median": [round(v, 1) for v in ratio[order[:10]].tolist()], "n_channels": amax.numel()}


def activation_stats(art, samples: list, float_gm=None) -> tuple[list, list, dict]:
    """(histograms, outlier channels, {value: clipped share}) of the quantized activations on ``samples``.
    With ``float_gm`` the values are the float model's (each layer judged on its own, not behind its
    already-clipped inputs); else the reference graph's."""
    points = quant_points(art.reference)
    if not points or not samples:
        return [], [], {}
    values: dict[str, list] = {}
    for args, kwargs in samples:
        seen = record_points(float_gm, points, args, kwargs) if float_gm is not None else {}
        if len(seen) < len(points):  # names the float graph lacks: the reference graph's values
            seen = {**record_points(art.reference, points, args, kwargs), **seen}
        for k, v in seen.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                values.setdefault(k, []).append(v.detach().float().flatten(0, 0) if v.dim() else v.reshape(1))
    hists, outliers, clipped = [], [], {}
    for p in points:
        vs = values.get(p.value)
        if not vs:
            continue
        x = torch.cat(vs) if all(v.shape[1:] == vs[0].shape[1:] for v in vs) else vs[0]
        h = histogram(x, p)
        hists.append(h)
        clipped[p.value] = h["clipped_share"]
        o = outlier_channels(x, p.value, p.module)
        if o:
            outliers.append(o)
    return hists, outliers, clipped


# -- findings ---------------------------------------------------------------------------------------------
def findings(growth: dict, clipped: dict, outliers: list, n_samples: int, has_heldout: bool) -> list[dict]:
    out = []
    moving = sorted(((g, k) for k, g in growth.items() if g > MOVING), reverse=True)
    if n_samples < 2:
        out.append({"kind": "too small", "message": f"{n_samples} calibration sample(s): nothing shows whether the "
                    "ranges have settled; calibrate on tens to hundreds of representative samples"})
    elif growth and len(moving) > MOVING_SHARE * len(growth):
        g, k = moving[0]
        out.append({"kind": "too small", "message": f"ranges still moving: {len(moving)} of {len(growth)} activation "
                    f"ranges grew > {MOVING:.0%} over the second half of the {n_samples} calibration samples "
                    f"(most: {k} +{g:.0%}); add calibration samples until they settle", "tensors": [k for _, k in moving]})
    bad = sorted(((s, k) for k, s in clipped.items() if s > CLEAN_SHARE), reverse=True)
    if has_heldout and clipped and len(bad) > CLEAN_TENSORS * len(clipped):
        s, k = bad[0]
        out.append({"kind": "too clean", "message": f"held-out data clips in {len(bad)} of {len(clipped)} quantized "
                    f"tensors (worst: {k}, {s:.2%} of values outside the range); calibrate on data as varied as "
                    f"production, or use a percentile / MSE observer", "tensors": [k for _, k in bad]})
    for o in outliers:
        chans = ", ".join(f"{c} ({r}x)" for c, r in zip(o["channels"][:5], o["times_median"][:5]))
        out.append({"kind": "outlier channels", "message": f"{o['tensor']} ({o['module']}): channel(s) {chans} of "
                    f"{o['n_channels']} reach far beyond the median channel's range; one per-tensor scale wastes "
                    f"most int8 steps on them: equalize (SmoothQuant-style), use per-channel/per-token activations "
                    f"or keep the layer float (exclude=[{o['module']!r}])", "tensor": o["tensor"],
                    "channels": o["channels"]})
    return out


def after_calibration(art, prepared, held_out: list, source: str, seen: dict, n_calibration: int) -> None:
    """Fill report.heldout, layer_sqnr, activations and health from the held-out samples."""
    from .sensitivity import node_sqnr
    ctx = prepared._ctx
    samples, errors = [], []
    names = [n.target for n in prepared.gm.graph.nodes if n.op == "placeholder"]
    for i, s in enumerate(held_out):
        try:
            samples.append(_as_inputs(s, ctx, i, names))
        except Exception as e:  # noqa: BLE001 - reported, never fatal for the compile
            errors.append(str(e).splitlines()[0])
    batches = samples or [(tuple(ctx.inputs.args), dict(ctx.inputs.kwargs))]
    per_batch = []
    for args, kwargs in batches:
        try:
            per_batch.append(verify_batch(art, ctx.float_gm, args, kwargs))
        except Exception as e:  # noqa: BLE001 - e.g. a batch size the runtime was not exported for
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    rep = art.report
    rep.heldout = {"source": source if samples else "example inputs", "batches": per_batch,
                   "summary": distribution(per_batch), "errors": errors}
    try:
        rep.layer_sqnr = node_sqnr(ctx.float_gm, art.reference, *batches[0])
    except Exception as e:  # noqa: BLE001
        rep.layer_sqnr, rep.heldout["layer_sqnr_error"] = [], str(e).splitlines()[0]
    hists, outliers, clipped = activation_stats(art, batches, ctx.float_gm)
    rep.activations = hists
    calibrated = ctx.mode == "static"  # dynamic / weight-only (and QAT's trained ranges) are not calibrated here
    found = findings(moving_ranges(seen), clipped, outliers, n_calibration, bool(samples)) if calibrated else \
        [f for f in findings({}, clipped, outliers, 2, bool(samples)) if f["kind"] != "too small"]
    rep.health = {"findings": found,
                  "range_growth": {k: round(v, 4) for k, v in moving_ranges(seen).items()},
                  "heldout_clipped_share": clipped, "outlier_channels": outliers}
