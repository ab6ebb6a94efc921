"""The end-of-fit summary in the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from healthmon.alerts import Alert, severity_rank


def summary_lines(alerts: Sequence[Alert], *, log_dir: str | None = None) -> list[str]:
    """A compact table of alerts (most severe first), or one 'healthy' line."""
    lines: list[str] = []
    if not alerts:
        lines.append("healthmon: healthy - no numerical problems detected.")
    else:
        ordered = sorted(alerts, key=lambda a: (-severity_rank(a.severity), a.step))
        lines.append(f"healthmon: {len(alerts)} alert(s)")
        header = ("severity", "code", "first step", "count", "where")
        rows = [(a.severity, a.code, str(a.step), str(a.count), a.where or "-") for a in ordered]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append("  " + fmt.format(*header))
        for a, row in zip(ordered, rows, strict=True):
            lines.append("  " + fmt.format(*row))
            lines.append(f"      {a.message} Fix: {a.hint}")
    if log_dir:
        lines.append(f"healthmon: view it with: tensorboard --logdir {log_dir}")
    return lines
