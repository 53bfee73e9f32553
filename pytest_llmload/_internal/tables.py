"""One table formatter for every table the plugin prints (load report, plans, assertion failures)."""

from __future__ import annotations

from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, indent: str = "") -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing spaces."""
    lines = [tuple(str(c) for c in header), *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join((indent + "  ".join(c.ljust(w) for c, w in zip(line, widths))).rstrip() for line in lines)
