"""Render an analysis :class:`~sepconv.analyze.Report` as a rich table, Markdown or CSV (JSON: ``report.to_json()``).

The table is for reading (compact numbers, fits 100 columns, totals last); Markdown and CSV carry
exact integers.

>>> from torch import nn
>>> from sepconv.analyze import analyze
>>> print(to_csv(analyze(nn.Linear(4, 2), (3, 4))).splitlines()[1])
,Linear,"(3, 4)","(3, 2)",10,24,6,0,24,0,0,48,0
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, fields

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from sepconv.analyze import Measurement, Report, Row

__all__ = ["si", "to_csv", "to_markdown", "to_rich"]

_LEGEND = (
    "MACs: multiply-adds of convs, matmuls and attention (FLOPs = 2·MACs), whole batch; bias: bias adds, "
    "not in MACs; other: elements written by non-MAC ops (norms, activations, pooling, adds); "
    "act. B: bytes of new tensors written."
)
_BACKWARD_LEGEND = " bwd MACs: grad-input + grad-weight MACs of the backward pass (each = forward MACs for a conv)."


def si(value: float | None, unit: str = "") -> str:
    """A compact number: ``si(1814073344)`` is ``'1.81G'``; ``None`` is ``'n/a'``.

    >>> si(1814073344), si(9408), si(0), si(3211264, "B")
    ('1.81G', '9.41k', '0', '3.21MB')
    """
    if value is None:
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}" if float(value).is_integer() else f"{value:.3g}{unit}"


def _shape(shape: tuple[int, ...] | None) -> str:
    return "" if shape is None else "×".join(map(str, shape))


def _columns(report: Report) -> list[tuple[str, str]]:
    """(header, Row attribute) pairs shown in the table and Markdown."""
    columns = [("output", "output_shape"), ("params", "params"), ("MACs", "macs"), ("bias", "bias_adds")]
    columns += [("other", "other_ops"), ("act. B", "activation_bytes")]
    if report.backward:
        columns.append(("bwd MACs", "backward_macs"))
    return columns


def _display_name(row: Row) -> str:
    return row.name or "(model)"


def to_rich(report: Report, *, max_rows: int | None = None) -> Group:
    """The report as rich renderables: the layer table (totals last), then the what-if and measurement tables.

    ``max_rows`` keeps the first rows only (the total still covers all of them).
    """
    table = Table(title="Cost per layer", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1))
    table.add_column("layer", overflow="fold", min_width=16 if report.backward else 20)
    table.add_column("type", overflow="ellipsis", max_width=11)
    columns = _columns(report)
    for header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    rows = report.rows if max_rows is None else report.rows[:max_rows]
    for row in rows:
        table.add_row(_display_name(row), row.type, *(_cell(row, attr) for _, attr in columns))
    if len(rows) < len(report.rows):
        table.add_row(f"... {len(report.rows) - len(rows)} more rows", "", *([""] * len(columns)))
    table.add_section()
    table.add_row("total", report.total.type, *(_cell(report.total, attr) for _, attr in columns), style="bold")
    parts: list[object] = [table, Text(_LEGEND + (_BACKWARD_LEGEND if report.backward else ""))]
    if report.what_if is not None:
        parts.append(_what_if_table(report))
    if report.measurement is not None:
        parts.append(_measure_table(report))
    return Group(*parts)  # type: ignore[arg-type]


def _cell(row: Row, attr: str) -> str:
    value = getattr(row, attr)
    if attr == "output_shape":
        return _shape(value)
    return si(value, "B" if attr == "activation_bytes" else "")


def _what_if_table(report: Report) -> Table:
    assert report.what_if is not None
    title = "What if separable: standard convs (groups=1, kernel>1) ranked by MACs saved"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1))
    for header in ("layer", "kernel", "params", "sep. params", "MACs", "sep. MACs", "saved", "sep./std"):
        table.add_column(header, justify="left" if header == "layer" else "right", overflow="fold")
    for w in report.what_if:
        table.add_row(
            w.name,
            "×".join(map(str, w.kernel_size)),
            si(w.params),
            si(w.separable_params),
            si(w.macs),
            si(w.separable_macs),
            si(w.macs_saved),
            f"{w.separable_macs / w.macs:.3f}" if w.macs else "",
        )
    totals = report.what_if_totals()
    table.add_section()
    table.add_row(
        "model before/after",
        "",
        si(totals["params_before"]),
        si(totals["params_after"]),
        si(totals["macs_before"]),
        si(totals["macs_after"]),
        si(totals["macs_before"] - totals["macs_after"]),
        f"{totals['macs_after'] / totals['macs_before']:.3f}" if totals["macs_before"] else "",
        style="bold",
    )
    return table


def _measure_table(report: Report) -> Group:
    m = report.measurement
    assert m is not None
    table = Table(
        title=f"Measured forward pass on {_measured_on(m)}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0, 0, 1),
    )
    for header in ("model", "median ms", "IQR ms", "runs", "peak memory", "peak tensors", "speed vs model"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for label, timing, peak, tensors in (
        ("as given", m.model, m.model_peak_bytes, m.model_tensor_peak_bytes),
        ("separable twin", m.twin, m.twin_peak_bytes, m.twin_tensor_peak_bytes),
    ):
        speed = m.model.median_ms / timing.median_ms
        cells = (f"{timing.median_ms:.3f}", f"{timing.iqr_ms:.3f}", str(timing.runs), si(peak, "B"), si(tensors, "B"))
        table.add_row(label, *cells, f"{speed:.2f}x")
    note = (
        "Median of timed calls (3 interleaved rounds, the median round); the twin has random weights. "
        "Peak memory: CUDA allocator peak above what was allocated before the call; "
        "n/a on CPU (PyTorch keeps no CPU allocator statistics). Peak tensors: the most bytes of tensors the "
        "forward allocates alive at once, counted after every operator (any device; no allocator cache, no "
        "library workspaces)."
    )
    return Group(table, Text(note))


def _measured_on(m: Measurement) -> str:
    return f"{m.device} ({m.conditions})" if m.conditions else m.device


def to_markdown(report: Report) -> str:
    """A GitHub Markdown table with exact numbers, the total as the last row (what-if table after it).

    >>> from torch import nn
    >>> from sepconv.analyze import analyze
    >>> print(to_markdown(analyze(nn.Linear(4, 2), (3, 4))).splitlines()[-1])
    | **total** | Linear | 3×2 | 10 | 24 | 6 | 0 | 24 |
    """
    columns = _columns(report)
    header = ["layer", "type", *(h for h, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|"]
    for row in report.rows:
        lines.append("| " + " | ".join([_display_name(row), row.type, *_exact(row, columns)]) + " |")
    lines.append("| " + " | ".join(["**total**", report.total.type, *_exact(report.total, columns)]) + " |")
    if report.what_if is not None:
        lines += [
            "",
            "| layer | kernel | params | sep. params | MACs | sep. MACs | MACs saved |",
            "|---|---|" + "---:|" * 5,
        ]
        for w in report.what_if:
            cells = [w.params, w.separable_params, w.macs, w.separable_macs, w.macs_saved]
            kernel = "×".join(map(str, w.kernel_size))
            lines.append(f"| {w.name} | {kernel} | " + " | ".join(f"{c:,}" for c in cells) + " |")
        t = report.what_if_totals()
        lines.append(
            f"| **model before/after** | | {t['params_before']:,} | {t['params_after']:,} | {t['macs_before']:,} | "
            f"{t['macs_after']:,} | {t['macs_before'] - t['macs_after']:,} |"
        )
    if report.measurement is not None:
        m = report.measurement
        lines += [
            "",
            f"| model on {_measured_on(m)} (twin: separable, random weights) "
            "| median ms | IQR ms | runs | peak bytes | peak tensor bytes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, t, peak, tensors in (
            ("as given", m.model, m.model_peak_bytes, m.model_tensor_peak_bytes),
            ("twin", m.twin, m.twin_peak_bytes, m.twin_tensor_peak_bytes),
        ):
            shown = ["n/a" if v is None else f"{v:,}" for v in (peak, tensors)]
            lines.append(f"| {label} | {t.median_ms:.3f} | {t.iqr_ms:.3f} | {t.runs} | {shown[0]} | {shown[1]} |")
    return "\n".join(lines) + "\n"


def _exact(row: Row, columns: list[tuple[str, str]]) -> list[str]:
    return [_shape(getattr(row, a)) if a == "output_shape" else f"{getattr(row, a):,}" for _, a in columns]


def to_csv(report: Report) -> str:
    """Every row field as CSV, one line per row, then a ``total`` line (its name column says ``total``).

    With a what-if, two more columns: ``params_if_separable`` and ``macs_if_separable``, each row's (and the
    total's) figures once every what-if conv is replaced by its separable twin (rows without one: unchanged).
    """
    names = [f.name for f in fields(Row)]
    saved = _what_if_savings(report)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names + (["params_if_separable", "macs_if_separable"] if saved is not None else []))
    for index, row in enumerate((*report.rows, report.total)):
        data = asdict(row)
        line = [str(data[n]) if isinstance(data[n], tuple) else data[n] for n in names]
        if saved is not None and index < len(report.rows):
            line += [row.params - saved[index][0], row.macs - saved[index][1]]
        elif saved is not None:  # the total: the model's own before/after (its params count every parameter)
            totals = report.what_if_totals()
            line += [totals["params_after"], totals["macs_after"]]
        writer.writerow(line)
    return buffer.getvalue()


def _what_if_savings(report: Report) -> list[tuple[int, int]] | None:
    """(params saved, MACs saved) per row by the what-if, or None without one. A what-if conv belongs to the row
    of its name, or, in rows summed per name prefix (``Report.by_depth``), to the row of its longest prefix."""
    if report.what_if is None:
        return None
    index = {row.name: i for i, row in enumerate(report.rows)}
    saved = [(0, 0)] * len(report.rows)
    for w in report.what_if:
        parts = w.name.split(".")
        owner = next(
            (index[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in index), None
        )
        if owner is None:  # its row was left out of the report (rows cut by hand): the total still has it
            continue
        params, macs = saved[owner]
        saved[owner] = (params + w.params_saved, macs + w.macs_saved)
    return saved
