"""Accuracy tables (`llava_uhd.eval.reporting`)."""

from __future__ import annotations

from llava_uhd.eval.reporting import accuracy_table, markdown_table, pct, text_table


def _results() -> dict:
    def scores(a, b, fine, overall):
        return {"per_kind": {"probe_colour": {"accuracy": a}, "grey_probe": {"accuracy": b}},
                "fine_detail": {"accuracy": fine}, "all": {"accuracy": overall}}

    return {"kinds": ["probe_colour", "grey_probe"], "eval_kind_counts": {"probe_colour": 3, "grey_probe": 1},
            "variants": {"uhd": {**scores(1.0, 0.5, 1.0, 0.875), "steps": 4}},
            "prior": scores(1 / 3, None, 1 / 3, 0.25)}


def test_accuracy_table_rows_extra_columns_and_prior():
    header, rows = accuracy_table(_results(), [("steps", lambda r: str(r["steps"]))])
    assert header == ["variant", "probe_colour", "grey_probe", "fine-detail", "steps"]
    assert rows == [["uhd", "100.0", "50.0", "100.0", "4"], ["prior (no image)", "33.3", "n/a", "33.3", "-"]]
    header, rows = accuracy_table(_results(), overall=True, counts=True, bold=True)
    assert header == ["variant", "probe_colour (n=3)", "grey_probe (n=1)", "fine-detail", "all"]
    assert rows[0] == ["**uhd**", "100.0", "50.0", "**100.0**", "87.5"] and rows[1][0] == "prior (no image)"


def test_markdown_and_text_tables():
    assert markdown_table(["a", "b"], [["1", "22"]]) == ["| a | b |", "|---|---|", "| 1 | 22 |"]
    assert text_table(["name", "x"], [["ab", "1"], ["abcdef", "100"]]).splitlines() == \
        ["name      x", "ab        1", "abcdef  100"]
    assert pct(None) == "n/a" and pct(0.1234) == "12.3"
