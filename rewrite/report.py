"""The report: a model summary and one record per pass, as JSON and as a terminal table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .pass_manager import PassRecord


@dataclass
class Report:
    """What happened to a model: ``model`` (name, capture path, parameters, nodes, bytes, FLOPs),
    ``records`` (one per pass), ``exports`` (artifacts written, by kind) and ``execution`` (how to run the
    module, ``ExecutionPlan.to_dict()``, when a pass decided it)."""

    model: dict[str, Any] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)
    exports: dict[str, Any] = field(default_factory=dict)
    execution: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = {"model": self.model, "passes": [r.to_dict() for r in self.records], "exports": self.exports}
        if self.execution is not None:
            data["execution"] = self.execution
        return data

    def to_json(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def record(self, name: str) -> PassRecord:
        """The record of the pass called ``name`` (KeyError if it did not run)."""
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(name)


def human_bytes(count: float | None) -> str:
    """``1536`` → ``1.5 KiB``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def human_count(count: float | None) -> str:
    """``1234567`` → ``1.23M``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1000 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.2f}{unit}"
        value /= 1000
    return f"{value:.2f}P"


def render(report: Report, console: Any) -> None:
    """Print the report on a ``rich`` console: the model, then a table of the passes."""
    from rich.table import Table

    model = report.model
    console.print(f"[bold]{model.get('name')}[/bold]: captured with {model.get('capture_path')}, "
                  f"{model.get('nodes')} nodes, {human_count(model.get('params'))} parameters "
                  f"({human_count(model.get('trainable_params'))} trainable), "
                  f"{human_bytes(model.get('saved_activation_bytes'))} saved for backward, "
                  f"{human_count(model.get('flops'))} FLOPs forward, {human_count(model.get('training_flops'))} "
                  "per training step (forward + backward; matmuls, convolutions and attention as "
                  "torch.utils.flop_counter counts them)")
    if model.get("data_branches"):
        console.print(f"[yellow]specialised on the example's data[/yellow] at {len(model['data_branches'])} "
                      f"branch(es): {'; '.join(model['data_branches'])}. Inputs that branch otherwise raise "
                      "(never a wrong result): capture with an example like them.")
    if model.get("custom_functions"):
        console.print(f"custom autograd.Function(s) {', '.join(model['custom_functions'])}: the graph differentiates "
                      "their forward (export drops a custom backward); checked to give the model's gradients on the "
                      "example")
    table = Table(title="passes")
    for column in ("pass", "changed", "what", "trainable", "saved for bwd", "fwd FLOPs", "train step FLOPs",
                   "verify out/grad err", "s"):
        table.add_column(column, overflow="fold")
    for record in report.records:
        stats, verify = record.stats, record.verify
        what = record.details.get("summary") or record.reason or ""
        check = "-" if verify is None else (
            f"{'ok' if verify.ok else 'FAIL'} {verify.output_max_rel:.1e} / {verify.grad_max_rel:.1e}"
            + (f" ({verify.grad_max_rel_param})" if getattr(verify, "grad_max_rel_param", None) else "")
            + (f"; no gradient: {len(verify.no_grad_params)}" if getattr(verify, "no_grad_params", None) else ""))
        table.add_row(record.name, "yes" if record.changed else "no", str(what),
                      _arrow(stats.get("trainable_before"), stats.get("trainable_after"), human_count),
                      _arrow(stats.get("saved_activation_bytes_before"), stats.get("saved_activation_bytes_after"), human_bytes),
                      _arrow(stats.get("flops_before"), stats.get("flops_after"), human_count),
                      _arrow(stats.get("training_flops_before"), stats.get("training_flops_after"), human_count),
                      check, f"{record.seconds:.2f}s")
    console.print(table)
    for record in report.records:
        if isinstance(record.details.get("candidates"), list):
            render_candidates(record, console)
    for kind, where in report.exports.items():
        console.print(f"wrote {kind}: {where}")


def _arrow(before: Any, after: Any, fmt: Any) -> str:
    if before is None:
        return "-"
    return fmt(before) if before == after else f"{fmt(before)} → {fmt(after)}"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value * 1e3:.4g} ms"


def render_candidates(record: PassRecord, console: Any) -> None:
    """Print the candidate table a searching pass (``auto``) left in ``details["candidates"]``: each stack,
    how it runs, predicted and measured step time and memory, its status and why; then the notes and the
    reason for the choice."""
    from rich.table import Table

    details = record.details
    table = Table(title=f"{record.name}: candidates (memory limit {human_bytes(details.get('memory_limit_bytes'))}, "
                        f"search {details.get('search_seconds', 0):.1f} s, of which compiling "
                        f"{details.get('compile_seconds', 0):.1f} s; budget {details.get('budget_seconds', 0):g} s)")
    for column in ("candidate", "predicted step", "predicted mem", "measured step (min–max)", "measured mem",
                   "status", "why"):
        table.add_column(column, overflow="fold")
    for row in details["candidates"]:
        measured = _seconds(row.get("measured_step_seconds"))
        if row.get("measured_min_step_seconds") is not None:
            measured += (f" ({_seconds(row['measured_min_step_seconds'])}–{_seconds(row['measured_max_step_seconds'])}, "
                         f"{row.get('steps_timed')} steps)")
        table.add_row(row.get("label", ""), _seconds(row.get("predicted_step_seconds")),
                      human_bytes(row.get("predicted_memory_bytes")), measured,
                      human_bytes(row.get("measured_memory_bytes")), row.get("status", ""), row.get("reason", ""))
    console.print(table)
    for note in details.get("notes", []):
        console.print(f"  note: {note}", highlight=False)
    if details.get("why"):
        console.print(f"  chose {details.get('winner', {}).get('label', '')}: {details['why']}", highlight=False)
