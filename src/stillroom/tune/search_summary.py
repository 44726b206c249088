"""The result contract of a search run: the starting and the chosen student, each distilled and
from labels alone, on the test split; the Pareto front listed in the notes."""

from __future__ import annotations

from typing import Any

from stillroom.config import Recipe
from stillroom.results import Summary, describe, gap_note
from stillroom.tune.search_costs import RUNTIMES
from stillroom.tune.summary import _row


def search_summary(
    start: Recipe,
    chosen: Recipe,
    payload: dict[str, Any],
    front: list[dict[str, Any]],
    picked: dict[str, Any],
) -> Summary:
    comparison = payload["comparison"]
    metric, higher = comparison["metric"], payload["higher_is_better"]
    seeds = sorted(comparison["seeds"], key=int)
    first, rows = seeds[0], comparison["costs"]
    folder = f"final/{comparison['tuned_folder']}-seed{first}"
    start_arch, chosen_arch = describe(start.student.spec()), describe(chosen.student.spec())
    roles = [
        ("teacher", "teacher", "teacher", f"final/start-seed{first}/teacher", "", "teacher"),
        ("scratch", "student_scratch (starting)", "baseline", None, "", "student_scratch"),
        ("start", "student_kd (starting)", "distilled", None, "teacher", "start"),
        ("tuned_scratch", "student_scratch (chosen)", "baseline", None, "", "tuned_scratch"),
        ("tuned", "student_kd (chosen)", "distilled", None, "teacher", "tuned"),
    ]
    models = []
    for key, name, role, where, teacher, cost in roles:
        if comparison[key]["mean"] is None:
            continue
        chosen_row = key.startswith("tuned")
        sub = "student_scratch" if role == "baseline" else "student_kd"
        models.append(
            _row(
                name,
                role,
                comparison[key],
                metric,
                rows.get(cost),
                folder=where
                or (f"{folder}/{sub}" if chosen_row else f"final/start-seed{first}/{sub}"),
                architecture=describe(start.teacher.spec())
                if key == "teacher"
                else chosen_arch
                if chosen_row
                else start_arch,
                teacher=teacher,
            )
        )
    mean = {
        k: comparison[k]["mean"] for k in ("teacher", "scratch", "start", "tuned", "tuned_scratch")
    }
    c, s = picked["costs"], payload["start_costs"]
    notes = [
        f"test {metric}: mean +- std over seeds {', '.join(seeds)} (each seed: its own split and "
        "teacher, shared by every student of that seed); full schedule for each",
        f"chosen: trial {picked['number']}, {chosen_arch}, val {metric} {picked['value']:.4f}, the "
        f"best of {len(payload['candidates'])} candidates inside {payload['budget']} "
        f"(limit {payload['limit']:.4g}); chosen_recipe.yaml",
        f"costs (search's measurement, {c['threads']} thread(s), median, batch 1): chosen "
        f"{_costs(c)}; starting {_costs(s)} (the chosen at "
        f"{c['latency_ms'] / s['latency_ms']:.0%} of its latency_ms)",
    ]
    for which, scratch in (("start", "scratch"), ("tuned", "tuned_scratch")):
        if mean[scratch] is not None:
            line = gap_note(mean["teacher"], mean[scratch], mean[which], metric, higher)[1]
            notes.append(f"{'starting' if which == 'start' else 'chosen'}: {line}")
    for row in front:
        rc = row["costs"]
        notes.append(
            f"front: trial {row['number']} {describe(row['spec'])}"
            f"{' (start)' if row['starting_student'] else ''}: val {metric} {row['value']:.4f}, "
            f"{rc['parameters']:,} params, {rc['size_kb']:.1f} KB, {rc['latency_ms']:.4f} ms"
        )
    return Summary(
        method="search",
        title=f"{start.name}: the student searched under {payload['budget']}, test set",
        task="classification" if metric == "accuracy" else "regression",
        metric=metric,
        higher_is_better=higher,
        models=models,
        settings={
            "objective": payload["objective"],
            "candidates": f"{len(payload['candidates'])} finished, study {payload['study_name']} "
            f"in {payload['storage']}, Pareto front of {len(front)} (front.md)",
            "budget": f"{payload['budget']} -> limit {payload['limit']:.4g}",
            "starting student": f"{start_arch}, distill epochs {start.distill.epochs}",
        },
        notes=notes,
        primary="student_kd (chosen)",
    )


def _costs(c: dict[str, Any]) -> str:
    times = [
        f"{label} {c[f'{key}_ms']:.4f} ms" for key, label in RUNTIMES.items() if f"{key}_ms" in c
    ]
    return f"{c['parameters']:,} params, {c['size_kb']:.1f} KB ({c['file']}), {', '.join(times)}"
