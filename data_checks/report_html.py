"""The validation report as one self-contained HTML page.

Great Expectations' Data Docs are a small site: pages that load their styles and each
other by relative path. MLflow shows an HTML artifact on its own, inside the run page,
where those paths lead nowhere, so the Data Docs open there unstyled with dead links.
This page carries its styles inline and needs no other file: it reads the same wherever
it is opened (MLflow, a browser, a mail).
"""

from __future__ import annotations

from html import escape
from typing import Any

PAGE = "summary.html"

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem; color: #1f2328; }
h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
p.verdict { font-size: 1rem; margin: 0 0 1rem; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; }
th, td { border-bottom: 1px solid #d0d7de; padding: .35rem .5rem; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.passed { color: #1a7f37; font-weight: 600; }
.failed { color: #cf222e; font-weight: 600; }
.warned { color: #9a6700; font-weight: 600; }
code { font-size: .8rem; }
"""


def status(outcome: dict[str, Any]) -> tuple[str, str]:
    """(label, css class) of one expectation's outcome."""
    if outcome["success"]:
        return "passed", "passed"
    if outcome["severity"] == "warning":
        return "warning", "warned"
    return "failed", "failed"


def render(report: dict[str, Any], title: str = "Data validation (Great Expectations)") -> str:
    """The page for `report`, the JSON form of a `ValidationReport` (`to_dict()`)."""
    verdict = "passed" if report["success"] else "failed"
    rows = []
    for outcome in report["outcomes"]:
        label, css = status(outcome)
        examples = ", ".join(str(r) for r in outcome["examples"]) or "–"
        rows.append(
            "<tr>"
            f'<td class="{css}">{label}</td>'
            f"<td><code>{escape(outcome['name'])}</code></td>"
            f"<td>{escape(outcome['column'] or '(table)')}</td>"
            f"<td>{escape(outcome['severity'])}</td>"
            f'<td class="n">{outcome["unexpected_count"]}</td>'
            f"<td>{escape(examples)}</td>"
            f"<td>{escape(outcome['detail'])}</td>"
            "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("", "expectation", "column", "severity", "unexpected", "example rows", "detail")
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="verdict"><span class="{verdict}">{verdict}</span> on '
        f"{report['n_rows']} rows: {escape(report['summary'])}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<p>The full Great Expectations Data Docs are <code>index.html</code> in this folder "
        "(open it from a file browser: its pages link to each other).</p>"
        "</body></html>"
    )
