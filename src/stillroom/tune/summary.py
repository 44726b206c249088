"""The result contract of a tune run: the starting and the tuned recipe on the test split."""

from __future__ import annotations

from typing import Any

from stillroom.config import Recipe
from stillroom.results import ModelResult, Summary, describe, gap_note


def _row(
    name: str, role: str, stats: dict[str, Any], metric: str, run: dict[str, Any] | None, **extra
) -> ModelResult:
    return ModelResult(
        name=name,
        role=role,  # type: ignore[arg-type]
        metrics={metric: stats["mean"], f"{metric}_std": stats["std"]},
        parameters=run.get("parameters") if run else None,
        size_bytes=run.get("size_bytes") if run else None,
        latency_ms=run.get("latency_ms") if run else None,
        **extra,
    )


def tune_summary(
    start: Recipe,
    tuned: Recipe,
    payload: dict[str, Any],
    comparison: dict[str, Any],
    higher: bool,
) -> Summary:
    metric = comparison["metric"]
    seeds = sorted(comparison["seeds"], key=int)
    first = seeds[0]
    rows = comparison["costs"]
    teacher_arch = describe(start.teacher.spec())
    student_arch = describe(start.student.spec())
    models = [
        _row(
            "teacher",
            "teacher",
            comparison["teacher"],
            metric,
            rows.get("teacher"),
            folder=f"final/start-seed{first}/teacher",
            architecture=teacher_arch,
        ),
        _row(
            "student_scratch",
            "baseline",
            comparison["scratch"],
            metric,
            rows.get("student_scratch"),
            folder=f"final/start-seed{first}/student_scratch",
            architecture=student_arch,
        ),
        _row(
            "student_kd (starting recipe)",
            "distilled",
            comparison["start"],
            metric,
            rows["start"],
            folder=f"final/start-seed{first}/student_kd",
            architecture=student_arch,
            teacher="teacher",
        ),
        _row(
            "student_kd (tuned)",
            "distilled",
            comparison["tuned"],
            metric,
            rows["tuned"],
            folder=f"final/{comparison['tuned_folder']}-seed{first}/student_kd",
            architecture=describe(tuned.student.spec()),
            teacher="teacher",
        ),
    ]
    if comparison["scratch"]["mean"] is None:
        models = [m for m in models if m.role != "baseline"]
    mean = {k: comparison[k]["mean"] for k in ("teacher", "scratch", "start", "tuned")}
    notes = [
        f"test {metric}: mean +- std over seeds {', '.join(seeds)} (each seed: its own split and "
        "teacher, shared by the starting and the tuned student)",
        f"tuned: {', '.join(f'{k}={v}' for k, v in payload['best_params'].items())}; best val "
        f"{metric} {payload['best_value']:.4f} after {payload['trials']} trials "
        f"({payload['pruned']} pruned); best_recipe.yaml",
    ]
    for which in ("start", "tuned"):
        if mean["scratch"] is not None:
            line = gap_note(mean["teacher"], mean["scratch"], mean[which], metric, higher)[1]
            notes.append(f"{which}: {line}")
    return Summary(
        method="tune",
        title=f"{start.name}: tuned vs starting recipe, test set",
        task="classification" if metric == "accuracy" else "regression",
        metric=metric,
        higher_is_better=higher,
        models=models,
        settings={
            "objective": payload["objective"],
            "trials": f"{payload['trials']} finished ({payload['pruned']} pruned), "
            f"{payload['workers']} worker(s), study {payload['study_name']} in "
            f"{payload['storage']}",
            "space": ", ".join(p for p in payload["trial_list"][0]["params"])
            if payload["trial_list"]
            else "",
            "starting recipe": f"T {start.distill.temperature}, alpha {start.distill.alpha}, "
            f"lr {start.distill.lr}, epochs {start.distill.epochs}",
        },
        notes=notes,
        primary="student_kd (tuned)",
    )
