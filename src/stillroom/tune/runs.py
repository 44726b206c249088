"""The runs a study makes outside its trials, shared by `tune` and `search`: the teacher trained
and cached once into RUN/store, and the final comparison on the test split over seeds."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from stillroom.config import Recipe, validate_recipe
from stillroom.errors import StillroomError
from stillroom.tune.space import with_values


def teacher_store(
    run_dir: Path,
    recipe: Recipe,
    splits: Any,
    student_train: Any,
    progress: bool,
    resume: bool,
    command: str = "stillroom tune",
) -> Path:
    """The teacher trained once (or given) and its outputs over the training set cached once,
    in RUN_DIR/store: every trial, in every worker, reads this store."""
    from stillroom.models import load_model, save_model
    from stillroom.pipeline import given_teacher, train_teacher
    from stillroom.runs import is_complete
    from stillroom.store import cache_teacher

    folder = run_dir / "teacher"
    if is_complete(folder):
        teacher, _ = load_model(folder)
    else:
        given = given_teacher(recipe, splits)
        if given is not None:
            saved, meta = given
            save_model(saved, meta.pop("spec"), folder, **meta)
            teacher, _ = load_model(folder)
        else:
            teacher = train_teacher(recipe, run_dir, splits, progress=progress, resume=resume)
    store = run_dir / "store"
    if not (store / "manifest.json").is_file() or not _store_fits(store, teacher, student_train):
        cache_teacher(
            teacher,
            student_train,
            store,
            precision="fp32",
            resume=store.exists(),
            progress=progress,
            command=f"{command} (the run's teacher, cached once for every trial)",
        )
    return store


def _store_fits(store: Path, teacher: Any, data: Any) -> bool:
    from stillroom.store import StoreTeacher

    try:
        StoreTeacher(store, teacher=teacher, data=data)
    except StillroomError:
        return False
    return True


# --- the final comparison on the test split ------------------------------------------------------


def run_classic(tree: dict[str, Any], folder: Path, source: str) -> dict[str, Any]:
    """A classic run of `tree` into `folder` (kept when finished, resumed when started)."""
    from stillroom.methods.classic import load_results, run_recipe
    from stillroom.runs import release

    if (folder / "results.json").is_file():
        return load_results(folder)
    recipe = validate_recipe(tree, source, Recipe)
    try:
        run_recipe(recipe, folder, resume=(folder / "config.yaml").is_file(), progress=False)
    finally:
        release(folder)
    return load_results(folder)


def compare_on_seeds(
    run_dir: Path,
    start_tree: dict[str, Any],
    best_tree: dict[str, Any],
    best_name: str,
    first_seed: int,
    seeds: int,
    metric: str,
    tuned_baseline: bool = False,
) -> dict[str, Any]:
    """The starting and the tuned recipe on `seeds` seeds; per seed one teacher (trained by the
    starting run) that the tuned run loads, so both students learn from the same teacher.
    tuned_baseline: also train the tuned student from labels alone ("tuned_scratch": search
    compares a new architecture with itself trained without the teacher)."""
    from stillroom.cli.common import console

    per_seed: dict[str, dict[str, Any]] = {}
    for seed in range(first_seed, first_seed + seeds):
        start_dir = run_dir / "final" / f"start-seed{seed}"
        console.print(
            f"final comparison: seed {seed} ({seed - first_seed + 1} of {seeds})", highlight=False
        )
        start = run_classic(with_values(start_tree, {"seed": seed}), start_dir, "starting recipe")
        tuned_tree = with_values(
            best_tree,
            {
                "seed": seed,
                "baseline": tuned_baseline,
                "teacher.checkpoint": str(start_dir / "teacher"),
            },
        )
        tuned = run_classic(
            tuned_tree, run_dir / "final" / f"{best_name}-seed{seed}", "tuned recipe"
        )
        if seed == first_seed:  # parameters, size and latency: the same on every seed
            costs = {
                "teacher": start["models"]["teacher"],
                "student_scratch": start["models"].get("student_scratch"),
                "start": start["models"]["student_kd"],
                "tuned": tuned["models"]["student_kd"],
                "tuned_scratch": tuned["models"].get("student_scratch"),
            }
        per_seed[str(seed)] = {
            "teacher": start["models"]["teacher"][metric],
            "scratch": start["models"]["student_scratch"][metric]
            if "student_scratch" in start["models"]
            else None,
            "start": start["models"]["student_kd"][metric],
            "tuned": tuned["models"]["student_kd"][metric],
            "tuned_scratch": tuned["models"]["student_scratch"][metric]
            if "student_scratch" in tuned["models"]
            else None,
        }
    keep = ("parameters", "size_bytes", "latency_ms")
    out: dict[str, Any] = {
        "metric": metric,
        "tuned_folder": best_name,
        "seeds": per_seed,
        "costs": {k: {f: v[f] for f in keep} if v else None for k, v in costs.items()},
    }
    for role in ("teacher", "scratch", "start", "tuned", "tuned_scratch"):
        values = [row[role] for row in per_seed.values() if row[role] is not None]
        out[role] = {
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out
