"""Accuracy tables of evaluated variants, as markdown or plain text: the ablation and the nano run report with them.

``results`` is the dict those runs write: ``kinds``, ``variants: {name: {"per_kind", "fine_detail", "all", ...}}``
(`score_predictions`' fields), ``prior`` (`score_prior`) and optionally ``eval_kind_counts``::

    header, rows = accuracy_table(results, extra=[("train time (s)", lambda r: f"{r['train_time_s']:.0f}")])
    print(text_table(header, rows))
    markdown = "\\n".join(markdown_table(header, rows))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["pct", "accuracy_table", "markdown_table", "text_table"]


def pct(fraction: float | None) -> str:
    """A fraction as a percentage with one decimal (``"n/a"`` for None)."""
    return "n/a" if fraction is None else f"{100 * fraction:.1f}"


def accuracy_table(results: dict[str, Any], extra: Sequence[tuple[str, Callable[[dict], str]]] = (), *,
                   overall: bool = False, counts: bool = False, bold: bool = False
                   ) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``: per variant its accuracy (%) per kind and over the fine-detail kinds, then the
    ``extra`` columns (``(title, cell(variant_results))``); a last row for the prior (``-`` in the extra
    columns). ``overall`` adds the accuracy over every kind, ``counts`` the number of held-out samples per kind
    to the kind titles, ``bold`` bolds the variant names and their fine-detail accuracy (markdown)."""
    kinds = results["kinds"]
    n = results.get("eval_kind_counts", {})
    strong = (lambda s: f"**{s}**") if bold else (lambda s: s)
    header = ["variant", *[f"{k} (n={n.get(k, 0)})" if counts else k for k in kinds], "fine-detail",
              *(["all"] if overall else []), *[title for title, _ in extra]]

    def accuracies(r: dict, mark) -> list[str]:
        per_kind = [pct(r["per_kind"].get(k, {}).get("accuracy")) for k in kinds]
        return [*per_kind, mark(pct(r["fine_detail"]["accuracy"])), *([pct(r["all"]["accuracy"])] if overall else [])]

    rows = [[strong(name), *accuracies(r, strong), *[cell(r) for _, cell in extra]]
            for name, r in results["variants"].items()]
    rows.append(["prior (no image)", *accuracies(results["prior"], lambda s: s), *["-"] * len(extra)])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(header[j]), *(len(r[j]) for r in rows)) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *[line(r) for r in rows]])
