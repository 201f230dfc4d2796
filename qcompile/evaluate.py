"""Task-level evaluation of a quantized model against its float reference: the metric overall and per slice,
the samples whose prediction changed, latency percentiles per batch size on the real runtime, memory, bytes.

    ev = qcompile.evaluate(art, model, {"inputs": x_test, "targets": y_test}, slices="targets")
    print(ev); ev.to_json("eval.json"); art.report.to_html("report.html", evaluation=ev)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import latency as timing
from .errors import InputError

TASKS = ("classification", "embedding", "sequence")
EVAL_BATCH = 64  # rows per forward when ``data`` holds a whole data set in one batch


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    targets: object  # tensor [n, ...] or None
    meta: dict       # per-sample values (tensors / lists of length n)
    n: int


@dataclass
class Evaluation:
    """What :func:`evaluate` measured. ``slices`` and ``changed`` are lists of dicts, worst slice first."""

    task: str
    metric: str
    n_samples: int
    reference_metric: float
    candidate_metric: float
    agreement: float  # top-1 / token agreement, or mean cosine for embeddings, candidate vs reference
    slices: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    n_changed: int = 0
    latency: dict = field(default_factory=dict)  # {"candidate"|"reference": {batch: {p50_ms, ...}}}
    speedup: dict = field(default_factory=dict)  # batch -> median of per-pair reference/candidate time ratios
    memory: dict = field(default_factory=dict)
    model_bytes: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)

    @property
    def change(self) -> float:
        return self.candidate_metric - self.reference_metric

    def worst_slice(self) -> dict | None:
        return self.slices[0] if self.slices else None

    def to_dict(self) -> dict:
        return dict(asdict(self), change=self.change)

    def to_json(self, path: str | None = None) -> str:
        from .textfmt import to_json
        return to_json(self.to_dict(), path)

    def to_html(self, path: str | None = None, report=None) -> str:
        from .report_html import render
        return render(report, self, path)

    def __str__(self) -> str:
        from .textfmt import evaluation_text
        return evaluation_text(self)

    __repr__ = __str__




# -- data --------------------------------------------------------------------------------------------
def batches(data) -> list[Batch]:
    """Normalise ``data`` into batches. Accepted: a tensor (a data set of inputs), a dict
    ``{"inputs": tensor | tuple | dict, "targets": tensor, <key>: per-sample values}`` (a whole data set
    or one batch), or an iterable of batches: tensors, tuples of positional inputs, dicts of keyword
    inputs, or such ``{"inputs": ...}`` dicts."""
    if isinstance(data, (torch.Tensor, dict)):
        return _split(_one(data))
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise InputError(f"evaluate: data must be a tensor, a dict with 'inputs' or an iterable of batches, "
                         f"got {type(data).__name__}")
    out = [b for item in data for b in _split(_one(item))]
    if not out:
        raise InputError("evaluate: data held no samples")
    return out


def _one(item) -> Batch:
    if isinstance(item, torch.Tensor):
        return Batch((item,), {}, None, {}, len(item))
    if isinstance(item, dict) and "inputs" in item:
        inp = item["inputs"]
        args, kwargs = ((), dict(inp)) if isinstance(inp, dict) else \
            ((inp,), {}) if isinstance(inp, torch.Tensor) else (tuple(inp), {})
        meta = {k: v for k, v in item.items() if k not in ("inputs", "targets")}
        first = next(iter(args), None) if args else next(iter(kwargs.values()))
        return Batch(args, kwargs, item.get("targets"), meta, len(first))
    if isinstance(item, dict):
        return Batch((), dict(item), None, {}, len(next(iter(item.values()))))
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return Batch(tuple(item), {}, None, {}, len(item[0]))
    raise InputError(f"evaluate: a batch must be a tensor, a tuple of tensors or a dict, got {type(item).__name__}")


def _take(v, sl: slice):
    return v[sl] if isinstance(v, (torch.Tensor, list, tuple)) else v


def _split(b: Batch) -> list[Batch]:
    if b.n <= EVAL_BATCH:
        return [b]
    return [Batch(tuple(_take(a, slice(i, i + EVAL_BATCH)) for a in b.args),
                  {k: _take(v, slice(i, i + EVAL_BATCH)) for k, v in b.kwargs.items()},
                  _take(b.targets, slice(i, i + EVAL_BATCH)),
                  {k: _take(v, slice(i, i + EVAL_BATCH)) for k, v in b.meta.items()}, min(EVAL_BATCH, b.n - i))
            for i in range(0, b.n, EVAL_BATCH)]


# -- running -----------------------------------------------------------------------------------------
def first_output(out) -> torch.Tensor:
    """The tensor evaluated: the output itself, ``logits`` / ``last_hidden_state`` of a model output, or
    the first tensor leaf."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = out.get(key) if isinstance(out, dict) or hasattr(out, "get") else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise InputError(f"evaluate: the model returned no tensor ({type(out).__name__})")
    return leaves[0]


@torch.no_grad()
def run_model(model, b: Batch, select=None) -> torch.Tensor:
    try:
        out = model(*b.args, **b.kwargs)
    except Exception:  # noqa: BLE001 - an artifact exported for a fixed batch: run it in pieces of that size
        fixed = _example_batch(model)
        if not fixed or fixed == b.n:
            raise
        return torch.cat([run_model(model, _rows(b, i, fixed), select)[:min(fixed, b.n - i)]
                          for i in range(0, b.n, fixed)])
    t = select(out, b) if select is not None else first_output(out)
    return t.detach().float()


def _example_batch(model) -> int | None:
    ex = getattr(model, "example_inputs", None)
    leaves = [t for t in torch.utils._pytree.tree_leaves((ex.args, ex.kwargs)) if isinstance(t, torch.Tensor)] \
        if ex is not None else []
    return int(leaves[0].shape[0]) if leaves and leaves[0].dim() else None


def _rows(b: Batch, start: int, size: int) -> Batch:
    """Rows start..start+size of ``b``, the last row repeated when ``b`` ends sooner."""
    idx = torch.arange(start, start + size).clamp(max=b.n - 1)
    pick = lambda v: v[idx] if isinstance(v, torch.Tensor) else v
    return Batch(tuple(pick(a) for a in b.args), {k: pick(v) for k, v in b.kwargs.items()}, None, {}, size)


def detect_task(out: torch.Tensor, task: str | None) -> str:
    if task is not None:
        if task not in TASKS:
            raise InputError(f"evaluate: task must be one of {TASKS}, got {task!r}")
        return task
    if out.dim() == 2:
        return "classification"
    return "sequence" if out.dim() == 3 and out.shape[-1] > 1 else "embedding"


# -- metrics -----------------------------------------------------------------------------------------
def per_sample_agreement(task: str, cand: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Per-sample score of ``cand`` against ``targ`` (label indices, or outputs of the reference)."""
    if task == "embedding":
        return F.cosine_similarity(cand.flatten(1), targ.flatten(1).to(cand.dtype), dim=1)
    pred = cand.argmax(-1)
    want = targ if not targ.is_floating_point() else targ.argmax(-1)
    agree = (pred == want).float()
    return agree if task == "classification" else agree.flatten(1).mean(1)


def _default_metric_name(task: str, labelled: bool) -> str:
    if task == "embedding":
        return "cosine to reference"
    base = "top-1" if task == "classification" else "token"
    return f"{base} accuracy" if labelled else f"{base} agreement with reference"


def _metric_values(task, metric, cand, ref, targets, idx) -> tuple[float, float]:
    """(reference metric, candidate metric) on the samples ``idx``."""
    tgt = targets[idx] if targets is not None else ref[idx]
    if metric is not None:
        return float(metric(ref[idx], tgt)), float(metric(cand[idx], tgt))
    if targets is None or task == "embedding":
        return 1.0, per_sample_agreement(task, cand[idx], ref[idx]).mean().item()
    return (per_sample_agreement(task, ref[idx], tgt).mean().item(),
            per_sample_agreement(task, cand[idx], tgt).mean().item())


def slice_labels(slices, all_batches: list[Batch], n: int) -> list:
    """One label per sample: ``slices`` is a key of the data dicts ("targets" or a metadata key), a
    sequence of n labels, or a function of one sample (a dict: index, inputs, kwargs, target, metadata)."""
    if slices is None:
        return []
    if isinstance(slices, str):
        vals = []
        for b in all_batches:
            src = b.targets if slices == "targets" else b.meta.get(slices)
            if src is None:
                raise InputError(f"evaluate: slices={slices!r} but a batch has no {slices!r} entry; "
                                 f"give data as {{'inputs': ..., {slices!r}: per-sample values}}")
            vals += [_label(v) for v in src]
        return vals
    if callable(slices):
        labels, i = [], 0
        for b in all_batches:
            for j in range(b.n):
                sample = {"index": i, "inputs": tuple(a[j] for a in b.args),
                          "kwargs": {k: v[j] for k, v in b.kwargs.items()},
                          "target": None if b.targets is None else b.targets[j],
                          **{k: v[j] for k, v in b.meta.items()}}
                labels.append(_label(slices(sample)))
                i += 1
        return labels
    labels = [_label(v) for v in slices]
    if len(labels) != n:
        raise InputError(f"evaluate: slices has {len(labels)} labels for {n} samples")
    return labels


def _label(v):
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v


def slice_table(task, metric, cand, ref, targets, labels) -> list[dict]:
    groups: dict = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    rows = []
    for lab, idx in groups.items():
        r, c = _metric_values(task, metric, cand, ref, targets, torch.tensor(idx))
        rows.append({"slice": str(lab), "n": len(idx), "reference": r, "candidate": c, "change": c - r})
    return sorted(rows, key=lambda row: (row["change"], row["candidate"], row["slice"]))


def changed_predictions(task, cand, ref, targets, labels, limit: int) -> tuple[int, list[dict]]:
    """Samples whose argmax differs (any token for sequences), with both predictions and confidences;
    for embeddings the samples with cosine < 0.99."""
    if task == "embedding":
        cos = per_sample_agreement(task, cand, ref)
        idx = torch.nonzero(cos < 0.99).flatten()
        idx = idx[cos[idx].argsort()]
        rows = [{"index": int(i), "cosine": round(cos[i].item(), 5)} for i in idx[:limit]]
    else:
        pc, pr = cand.softmax(-1), ref.softmax(-1)
        diff = (cand.argmax(-1) != ref.argmax(-1))
        idx = torch.nonzero(diff.flatten(1).any(1) if task == "sequence" else diff).flatten()
        rows = []
        for i in idx[:limit].tolist():
            if task == "classification":
                rc, cc = pr[i].max(-1), pc[i].max(-1)
                row = {"index": i, "reference_pred": int(rc.indices), "reference_conf": round(rc.values.item(), 4),
                       "candidate_pred": int(cc.indices), "candidate_conf": round(cc.values.item(), 4)}
            else:
                tok = torch.nonzero(diff[i]).flatten().tolist()
                row = {"index": i, "tokens_changed": tok[:20], "n_tokens_changed": len(tok),
                       "reference_pred": pr[i].argmax(-1)[tok[:20]].tolist(),
                       "candidate_pred": pc[i].argmax(-1)[tok[:20]].tolist(),
                       "reference_conf": round(pr[i].max(-1).values[tok].mean().item(), 4),
                       "candidate_conf": round(pc[i].max(-1).values[tok].mean().item(), 4)}
            rows.append(row)
    for row in rows:
        if labels:
            row["slice"] = str(labels[row["index"]])
        if targets is not None and task == "classification":
            row["target"] = int(targets[row["index"]])
    return len(idx), rows


# -- entry point -------------------------------------------------------------------------------------
def evaluate(candidate, reference, data, metric=None, slices=None, batch_sizes=(1, 8, 32), *, task=None,
             select=None, changed_limit: int = 100, timing_options: timing.TimingOptions | None = None,
             progress: bool = False) -> Evaluation:
    """Evaluate ``candidate`` (an Artifact or any model) against ``reference`` (usually the float model) on
    ``data`` (see :func:`batches`). ``metric(outputs, targets) -> float`` replaces the default (top-1 / token
    agreement or accuracy, cosine for embeddings); targets are the data's ``targets`` or else the reference
    outputs. ``slices``: a data key, per-sample labels or a per-sample function. ``task``: override the
    detection ("classification" for [N, C] outputs, "sequence" for [N, T, V], "embedding" otherwise).
    ``select(outputs, batch)``: the tensor to evaluate (default: logits / last_hidden_state / first).
    ``batch_sizes``: latency per batch size (empty: no timing). ``progress``: a progress bar."""
    from tqdm.auto import tqdm
    all_b = batches(data)
    cand = torch.cat([run_model(candidate, b, select)
                      for b in tqdm(all_b, desc="evaluating", disable=not progress, leave=False)])
    ref = torch.cat([run_model(reference, b, select) for b in all_b])
    if cand.shape != ref.shape:
        raise InputError(f"evaluate: candidate output {tuple(cand.shape)} vs reference {tuple(ref.shape)}")
    targets = [b.targets for b in all_b]
    targets = None if any(t is None for t in targets) else torch.cat([torch.as_tensor(t) for t in targets])
    kind = detect_task(cand, task)
    n = len(cand)
    everything = torch.arange(n)
    r_all, c_all = _metric_values(kind, metric, cand, ref, targets, everything)
    labels = slice_labels(slices, all_b, n)
    n_changed, changed = changed_predictions(kind, cand, ref, targets, labels, changed_limit)
    ev = Evaluation(kind, getattr(metric, "__name__", "metric") if metric else _default_metric_name(kind, targets is not None),
                    n, r_all, c_all, per_sample_agreement(kind, cand, ref).mean().item(),
                    slice_table(kind, metric, cand, ref, targets, labels) if labels else [], changed, n_changed)
    ev.runtime = {"candidate": timing.runtime_name(candidate), "reference": timing.runtime_name(reference)}
    ev.model_bytes = {"candidate": timing.model_bytes(candidate), "reference": timing.model_bytes(reference)}
    if batch_sizes:
        ev.latency, ev.speedup, ev.memory = timing.measure(candidate, reference, all_b, tuple(batch_sizes),
                                                           timing_options or timing.TimingOptions())
    return ev
