"""report.html of `pomona doctor`: a summary, then a section per kind of finding with the photos, each pair side by
side (small JPEG thumbnails embedded: the page opens offline); and the pieces of such a page (`Thumbnails`, `figure`,
`page`), which `pomona suggest` uses too."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from .doctor_checks import KINDS

_PAGE_CSS = """
.pairs{display:flex;flex-wrap:wrap;gap:14px}.pair{display:flex;gap:6px;background:#fafbf8;border:1px solid #e3e6e0;
border-radius:8px;padding:6px;font-size:.78em;max-width:420px}.pair figure{margin:0;width:200px}
.pair img,.photo img{width:200px;height:200px;object-fit:contain;background:#eee;border-radius:6px}
.photo{width:200px;font-size:.78em}.photo figure{margin:0}.pair figcaption,.photo figcaption{overflow-wrap:anywhere}
.note{color:#555;font-size:.85em}.warn{color:#a33}.kind{font-weight:600}
"""


class Thumbnails:
    """Small JPEG data URIs of photos, each made once per page."""

    def __init__(self, side: int = 100):
        self.side, self.cache = side, {}

    def __call__(self, path: str) -> str:
        from ..reporting.report import thumbnail

        if path not in self.cache:
            self.cache[path] = thumbnail(path, self.side) or ""
        return self.cache[path]


def figure(thumbs: Thumbnails, path: str, caption: str) -> str:
    src = thumbs(path)
    img = f'<img alt="{html.escape(Path(path).name)}" src="{src}">' if src else '<div class="warn">unreadable</div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A self-contained page: (id, heading, body HTML) sections."""
    from ..reporting.report import CSS

    body = "".join(f'<section id="{key}"><h2>{html.escape(heading)}</h2>{content}</section>'
                   for key, heading, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}{_PAGE_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(subtitle)}</p></header><main>{body}</main></body></html>")


def _name(path: str) -> str:
    p = Path(path)
    return html.escape(f"{p.parent.name}/{p.name}")


def _pairs(rows: pd.DataFrame, thumbs: Thumbnails, show: int, first: str, second: str) -> str:
    cards = []
    for r in rows.head(show).itertuples():
        cards.append('<div class="pair">' + figure(thumbs, r.photo, f"<b>{first}</b> {_name(r.photo)}<br>label "
                                                   f"{html.escape(str(r.label))}")
                     + figure(thumbs, r.other_photo, f"<b>{second}</b> {_name(r.other_photo)}<br>label "
                              f"{html.escape(str(r.other_label))}<br>{html.escape(r.detail)}") + "</div>")
    more = f'<p class="note">... and {len(rows) - show} more in issues.csv</p>' if len(rows) > show else ""
    return f'<div class="pairs">{"".join(cards)}</div>{more}'


def doctor_page(issues: pd.DataFrame, summary: dict, suspects: pd.DataFrame, show: int) -> str:
    from ..reporting.report import html_table

    thumbs = Thumbnails()
    counts = summary["findings"]
    n = summary["photos"]
    kpis = "".join(f'<div class="kpi"><b>{counts[k]}</b>{html.escape(k)}</div>' for k in KINDS
                   if counts[k] or k in ("test leak", "label conflict", "suspect label", "duplicate"))
    warn = "".join(f'<p class="warn">Warning: {html.escape(w)}</p>' for w in summary["warnings"])
    sections = [("summary", "Summary", kpis + warn + f'<p class="note">{n["data"]} photos'
                 + (f", {n['test']} test photos" if "test" in n else "") + f"; {summary['seconds']:.0f} s. Every "
                 "finding is a row of issues.csv, worst kinds first.</p>")]

    def of(kind: str) -> pd.DataFrame:
        return issues[issues["kind"] == kind]

    if "test" in n:
        leaks = of("test leak")
        sections.append(("leaks", f"Test photos that copy training photos ({len(leaks)})",
                         _pairs(leaks, thumbs, show, "test", "training") if len(leaks) else
                         "<p>None: no test photo is a copy or near-duplicate of a training photo.</p>"))
    conflicts = of("label conflict")
    sections.append(("conflicts", f"Near-identical photos under two labels ({len(conflicts)})",
                     _pairs(conflicts, thumbs, show, "", "") if len(conflicts) else "<p>None.</p>"))
    cards = []
    for r in suspects.head(show).itertuples():
        cards.append('<div class="photo">' + figure(
            thumbs, r.path, f"{_name(r.path)}<br>label <b>{html.escape(r.label)}</b> ({r.p_label:.0%})<br>suggested "
            f"<b>{html.escape(r.suggested)}</b> ({r.confidence:.0%})") + "</div>")
    more = f'<p class="note">... and {len(suspects) - show} more in issues.csv</p>' if len(suspects) > show else ""
    sections.append(("suspects", f"Suspect labels ({len(suspects)})", f'<p class="note">Confident learning on '
                     f'{html.escape(summary["suspects"]["probabilities"])}; most suspect first.</p>'
                     + (f'<div class="gallery">{"".join(cards)}</div>{more}' if cards else "<p>None.</p>")))
    dups = of("duplicate")
    sections.append(("duplicates", f"Copies within a class ({len(dups)})",
                     _pairs(dups, thumbs, show, "copy", "of") if len(dups) else "<p>None.</p>"))
    quality = issues[issues["kind"].isin(KINDS[4:10])]
    cards = ['<div class="photo">' + figure(thumbs, r.photo, f'<span class="kind">{html.escape(r.kind)}</span> '
                                            f"{_name(r.photo)}<br>{html.escape(r.detail)}") + "</div>"
             for r in quality.head(show).itertuples()]
    sections.append(("quality", f"Image quality ({len(quality)})",
                     f'<div class="gallery">{"".join(cards)}</div>' if cards else "<p>Nothing flagged.</p>"))
    outliers = of("outlier")
    sections.append(("outliers", f"Not like the others ({len(outliers)})",
                     _pairs(outliers, thumbs, show, "outlier", "its nearest photo") if len(outliers) else
                     "<p>None.</p>"))
    g = summary["groups"]
    sections.append(("groups", f"Near-duplicate groups ({g['n_groups']})", f"<p>{html.escape(g['method'])}: "
                     f"{g['n_groups']} groups, the largest of {g['largest']} photos, {g['singletons']} single "
                     "photos. Splits and folds keep each group on one side.</p>" + warn))
    b = summary["balance"]
    rows = [[c, v["photos"], v["groups"], v["largest_group"], v["balance_max_adds"]] for c, v in b["per_class"].items()]
    sections.append(("balance", "Balance", html_table(rows, ["class", "photos", "groups", "largest group",
                                                             "--balance max adds"])
                     + f'<p class="note">Largest class / smallest: {b["imbalance"]:.1f}. '
                       f'{html.escape(b["note"])}.</p>'))
    return page("pomona doctor", "what to fix before training", sections)
