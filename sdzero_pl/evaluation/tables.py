"""The comparison table (Markdown) from the summary ``python -m sdzero_pl.compare`` collects: per method the
held-out accuracy over seeds, its budget and the paired tests against the reference (:mod:`sdzero_pl.evaluation.stats`)."""

from __future__ import annotations

import math

from sdzero_pl.evaluation.premises import mark, premise_cell
from sdzero_pl.evaluation.stats import format_p


def _points(stat: dict) -> str:
    mean, std = 100 * stat["mean"], 100 * stat["std"]
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def comparison_table(summary: dict) -> str:
    k, rows, ref = summary["settings"]["k"], summary["rows"], summary["settings"]["reference"]
    ref_label = summary["settings"]["reference_label"]
    seeds, n = ", ".join(map(str, summary["settings"]["seeds"])), summary["settings"]["permutations"]
    tuned = any(row.get("setting") for row in rows.values())
    checked = any("premise" in row for row in rows.values())
    extra = (" setting (chosen on validation) |" if tuned else "") + (" premise check |" if checked else "")
    lines = [f"| method | held-out avg@{k} | pass@{k} | mean length | generations | generated tokens | "
             f"Δ avg@{k} vs {ref_label} (points) | 95% interval (seeds x questions) | p (seeds x questions) | "
             "p (seed means) | p (questions) |" + extra, "|---" * (11 + tuned + checked) + "|"]
    for method, row in rows.items():
        test = row.get(f"vs_{ref}")
        if test and not math.isnan(test["mean_diff_points"]):
            tests = [f"{test['mean_diff_points']:+.1f}", f"[{test['ci_low']:+.1f}, {test['ci_high']:+.1f}]",
                     format_p(test["bootstrap_p_value"], n), format_p(test["seed_p_value"]),
                     format_p(test["p_value"], n)]
        else:
            tests = ["reference" if method == ref else "n/a"] + ["n/a"] * 4
        if tuned:
            tests.append(row.get("setting") or "not tuned")
        if checked:
            tests.append(premise_cell(row.get("premise")))
        lines.append(f"| {mark(row['label'], row.get('premise'))} | {_points(row[f'avg@{k}'])} | "
                     f"{_points(row[f'pass@{k}'])} | {row['len_mean']['mean']:.1f} | "
                     f"{row['generations']['mean']:,.0f} | {row['tokens']['mean']:,.0f} | " + " | ".join(tests) + " |")
    questions = max((r[f"vs_{ref}"]["questions"] for r in rows.values() if f"vs_{ref}" in r), default=0)
    test = (f"the hierarchical bootstrap resamples seeds, then {questions} held-out questions, {n:,} times (its "
            f"interval: 2.5th-97.5th percentile); p (seed means): two-sided paired t-test over the seed-level mean "
            f"differences (training seeds as the random unit); p (questions): two-sided paired sign-flip test over "
            f"the questions of the per-question accuracy (fraction of the {k} samples correct, averaged over seeds), "
            f"{n:,} random flips, exact when fewer flips exist; '< 1/N': no resample reached it"
            if ref in rows else f"n/a ({ref_label} is not among the methods)")
    lines += ["", f"Seeds {seeds}; ± = standard deviation over seeds. Generations and tokens: the samples the "
              f"method trained on (mean over seeds; SD-Zero and the control include Phase 1's). Tests: {test}."]
    if checked:
        n_premise = summary["settings"].get("premise_questions")
        lines += ["", f"Premise checks: measured by the command on {n_premise} validation questions per seed, mean "
                  "over seeds (SD-Zero and the control: the reviser probe of each seed's SRT model, Phase 2's teacher "
                  "at step 0; SDFT: one sample per question from its teacher's prompt vs from the student's, base "
                  "model; docs/baselines.md, 'Premises'). A row whose premise fails is marked '(premise fails)': its "
                  "number is not evidence for or against the method."]
    benchmarks = list(next(iter(rows.values()))["benchmarks"]) if rows else []
    if len(benchmarks) > 1:  # the paper's per-benchmark columns (Table 1)
        lines += ["", f"| method | {' | '.join(benchmarks)} |", "|---" * (len(benchmarks) + 1) + "|"]
        lines += [f"| {row['label']} | " + " | ".join(_points(row["benchmarks"][b]) for b in benchmarks) + " |"
                  for row in rows.values()]
    return "\n".join(lines) + "\n"


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
