"""Token-level self-localization, the pure part (docs/method.md, "Analyses"): the bucket report and the HTML page
of :class:`~callbacks.SelfLocalizationLogger`.

The paper's claim is that the reviser's divergence from the student, D_t, concentrates on the tokens where a wrong
response goes wrong. The page makes that checkable in one click: it opens with an index of every response ranked
by its largest D_t, showing the token that holds it in its context, and each entry links to the response rendered
in full: the question, the reference answer, the reward, and every token shaded by its D_t. The bucket report
gives, per reward class, each D_t bucket's share of the total divergence (the paper's Fig. 4) and its mean D_t
(the absolute level the shares hide: both classes can put ~95% of their mass in bucket 0 while right answers sit
orders of magnitude lower).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

from sdzero_pl.evaluation.metrics import bucket_means, bucket_shares, mean_bucket_shares


@dataclass
class Response:
    question_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    question: str = ""  # x before the chat template (shown on the page)
    answer: str = ""  # the reference answer, as text (shown on the page; never in any model context)


@dataclass
class Scored:
    response: Response
    target_ids: list[int]  # y's tokens scored (after any length-budget truncation)
    divergence: list[float]  # D_t
    token_reward: list[float]  # log p_student(y_t) - log p_teacher(y_t)


def bucket_report(scored: Sequence[Scored], num_buckets: int, per_response: bool) -> dict[str, dict[str, Any]]:
    """Bucket shares, bucket means and summary numbers for r=0 ("r0") and r=1 ("r1"); a class with no tokens gets
    None for both."""
    report = {}
    for key, reward in (("r0", 0.0), ("r1", 1.0)):
        rows = [s for s in scored if (s.response.reward >= 0.5) == (reward >= 0.5) and s.divergence]
        values = [d for s in rows for d in s.divergence]
        long_enough = [s.divergence for s in rows if len(s.divergence) >= num_buckets]
        if per_response:  # responses shorter than num_buckets are left out (see mean_bucket_shares)
            shares = mean_bucket_shares(long_enough, num_buckets) if long_enough else None
            means = _mean_columns([bucket_means(d, num_buckets) for d in long_enough]) if long_enough else None
        else:
            shares = bucket_shares(values, num_buckets) if values else None
            means = bucket_means(values, num_buckets) if values else None
        report[key] = {
            "responses": len(rows),
            "tokens": len(values),
            "shares": shares,
            "means": means,
            "mean_divergence": sum(values) / len(values) if values else None,
            "mean_token_reward": (sum(t for s in rows for t in s.token_reward) / len(values)) if values else None,
        }
    return report


def _mean_columns(rows: list[list[float | None]]) -> list[float | None]:
    columns = [[v for v in column if v is not None] for column in zip(*rows)]
    return [sum(c) / len(c) if c else None for c in columns]


# ---------------------------------------------------------------------------------------------------- HTML
@dataclass(frozen=True)
class ResponseView:
    """One response as the page shows it."""

    question_id: str
    question: str
    answer: str
    reward: float
    tokens: list[str]  # y's scored tokens, decoded one by one
    divergence: list[float]  # D_t per token
    truncated: bool = False  # y was cut by the length budget before scoring

    def peak(self) -> tuple[int, float]:
        """Position and value of the largest D_t (the first, on ties); (-1, 0.0) for an empty response."""
        if not self.divergence:
            return -1, 0.0
        position = max(range(len(self.divergence)), key=lambda i: (self.divergence[i], -i))
        return position, self.divergence[position]


def ranked(views: Sequence[ResponseView]) -> list[ResponseView]:
    """Responses by their largest D_t, highest first (ties keep the input order)."""
    return sorted(views, key=lambda v: -v.peak()[1])


def _shade(value: float, vmax: float) -> float:
    return 0.0 if vmax <= 0 else max(0.0, min(1.0, value / vmax))


def _context(view: ResponseView, before: int = 8, after: int = 3) -> str:
    position, _ = view.peak()
    if position < 0:
        return "(empty)"
    left = "".join(view.tokens[max(0, position - before):position])
    right = "".join(view.tokens[position + 1:position + 1 + after])
    return (f"{html.escape(left)}<mark>{html.escape(view.tokens[position])}</mark>{html.escape(right)}"
            .replace("\n", "&#x23CE;"))


STYLE = ("body{font-family:sans-serif;max-width:64em;margin:auto}table{border-collapse:collapse}"
         "td,th{border-bottom:1px solid #ddd;padding:.15em .5em;text-align:left}"
         ".y{font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;padding:.5em}"
         ".ctx{font-family:monospace;white-space:pre}mark{background:rgba(220,38,38,.6)}"
         "dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em}dd{margin:0;white-space:pre-wrap}")


def render_html(views: Sequence[ResponseView], vmax: float, title: str, num_rendered: int) -> str:
    """A standalone page: the index of every response ranked by its largest D_t (with that token in context, linked
    to the response when it is rendered), then the ``num_rendered`` first of the ranking in full: question,
    reference answer, reward, D_t peak and each token shaded by D_t / vmax.

    Model and dataset text is escaped (``html.escape``): a response holding ``<script>`` shows it, never runs it."""
    order = ranked(views)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p>D_t: the per-token divergence between the student and the reviser (the teacher, shown the response and "
        "the control phrase its reward picks). The paper's claim: on a wrong response the largest D_t sits on the "
        f"token where it goes wrong. Responses ranked by their largest D_t; the first {min(num_rendered, len(order))} "
        "are rendered below (click a row).</p>",
        "<table><tr><th>#</th><th>question</th><th>r</th><th>max D_t</th><th>token (in context)</th></tr>",
    ]
    for rank, view in enumerate(order, start=1):
        label = html.escape(view.question_id)
        cell = f"<a href='#r{rank}'>{label}</a>" if rank <= num_rendered else label
        parts.append(f"<tr><td>{rank}</td><td>{cell}</td><td>{view.reward:g}</td><td>{view.peak()[1]:.3g}</td>"
                     f"<td class='ctx'>{_context(view)}</td></tr>")
    parts += ["</table>", f"<p>Token background: red intensity = D_t / {vmax:.4g} (clipped at 1). Hover a token for "
              "its value.</p>"]
    for rank, view in enumerate(order[:num_rendered], start=1):
        position, top = view.peak()
        spans = "".join(
            f"<span style='background:rgba(220,38,38,{_shade(v, vmax):.3f})' title='D_t={v:.4g}'>"
            f"{'<u>' if i == position else ''}{html.escape(tok, quote=True)}{'</u>' if i == position else ''}</span>"
            for i, (tok, v) in enumerate(zip(view.tokens, view.divergence)))
        note = " (cut by the length budget)" if view.truncated else ""
        parts.append(
            f"<h3 id='r{rank}'>#{rank}: question {html.escape(view.question_id)}, r={view.reward:g}</h3><dl>"
            f"<dt>question</dt><dd>{html.escape(view.question)}</dd>"
            f"<dt>reference answer</dt><dd>{html.escape(view.answer)}</dd>"
            f"<dt>reward</dt><dd>{view.reward:g} ({'right' if view.reward >= 0.5 else 'wrong'})</dd>"
            f"<dt>largest D_t</dt><dd>{top:.4g} on token {position + 1} of {len(view.tokens)} "
            f"(underlined){note}</dd></dl><div class='y'>{spans}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_tensorboard_text(items: Sequence[tuple[str, Sequence[str], Sequence[float]]], strong: float,
                            emphasis: float) -> str:
    """TensorBoard's text plugin strips colours, so high-D_t tokens are marked instead: bold above ``strong``,
    italic above ``emphasis``. Model text is escaped; newlines become ``<br>``."""
    parts = [f"<p>Bold: D_t &ge; {strong:.4g}; italic: D_t &ge; {emphasis:.4g}.</p>"]
    for heading, tokens, values in items:
        out = []
        for tok, v in zip(tokens, values):
            text = html.escape(tok, quote=True).replace("\n", "<br>")
            out.append(f"<strong>{text}</strong>" if v >= strong else f"<em>{text}</em>" if v >= emphasis else text)
        parts.append(f"<h4>{html.escape(heading)}</h4><p>{''.join(out)}</p>")
    return "\n".join(parts)
