"""The conversion report: a rich table per profile, or JSON."""

from __future__ import annotations

import json

from .pipeline import ProfileResult


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def render_json(results: list[ProfileResult]) -> str:
    """The report as JSON (``--json``)."""
    return json.dumps({"profiles": [r.to_dict() for r in results]}, indent=2, default=str)


def render_tables(results: list[ProfileResult], console) -> None:
    """Print one table per profile: every candidate, its size, latency, metrics and verdict."""
    from rich.table import Table

    styles = {"shipped": "bold green", "passed": "green", "rejected": "red", "failed": "red", "skipped": "yellow",
              "not tried": "dim"}
    for result in results:
        title = f"{result.profile}: " + (f"shipped {result.chosen} -> {result.bundle}" if result.bundle else f"no bundle ({result.error})")
        table = Table(title=title, title_justify="left", show_lines=False)
        for column in ("recipe", "status", "size", "size vs fp32", "p50 ms", "vs fp32", "agreement", "confident", "cosine", "max abs err", "why"):
            table.add_column(column, overflow="fold")
        for row in result.candidates:
            metrics = row.metrics or {}
            outputs = metrics.get("outputs", [])
            max_err = max((o["max_abs_error"] for o in outputs if "max_abs_error" in o), default=None)
            cosine = min((o["cosine"] for o in outputs if "cosine" in o), default=None)
            why = "; ".join(row.reasons)
            if row.details.get("note"):
                why += f" ({row.details['note']})"
            if row.details.get("float_layers"):
                why += f"; float layers: {', '.join(item['node'] for item in row.details['float_layers'])}"
            table.add_row(
                row.recipe, f"[{styles.get(row.status, '')}]{row.status}[/]",
                _fmt(row.size_bytes / 1024 if row.size_bytes else None, "{:.1f} KiB"), _fmt(row.size_ratio, "{:.2f}x"),
                _fmt(row.p50_ms, "{:.3f}"), _ratio(row), _fmt(metrics.get("agreement"), "{:.2%}"), _confident(outputs),
                _fmt(cosine, "{:.5f}"), _fmt(max_err, "{:.2e}"), why,
            )
        console.print(table)
        for note in result.notes:
            console.print(f"  note: {note}")
        for warning in (result.coverage or {}).get("warnings", []):
            console.print(f"  [yellow]op coverage:[/] {warning}")


def _ratio(row) -> str:
    """The latency ratio, with its 95% interval where it was measured interleaved."""
    interval = (row.details or {}).get("latency_ratio_ci")
    if row.latency_ratio is None:
        return "-"
    return f"{row.latency_ratio:.2f}x [{interval[0]:.2f}-{interval[1]:.2f}]" if interval else f"{row.latency_ratio:.2f}x"


def _confident(outputs: list[dict]) -> str:
    """Agreement on the samples the original is confident about, with how many there were."""
    rows = [o for o in outputs if "confident_agreement" in o]
    if not rows:
        return "-"
    worst = min(rows, key=lambda o: o["confident_agreement"])
    return f"{worst['confident_agreement']:.2%} of {worst['confident_samples']}"
