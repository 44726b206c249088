"""`stillroom search RECIPE --budget latency_ms=X`: the student's shape searched under a budget.

    recipe -> teacher (trained once, or given) -> one soft-target store over the training set
           -> N candidates drawn by NSGA-II (Optuna) from `search.space`: each distilled from the
              store on the short schedule (search.epochs), scored on the validation split, exported
              to ONNX and measured (parameters, KB, PyTorch / ONNX Runtime latency)
           -> the Pareto front of validation metric against the budget's cost
           -> the best candidate inside the budget retrained on the full schedule (distill.epochs)
              beside the starting student, each distilled and from labels alone, on the test
              split over `search.seeds` seeds (mean +- std)

Run folder:
    config.yaml                 the resolved recipe, search section included
    teacher/, store/            the teacher and its soft-target store, computed once
    study.db                    the Optuna study (SQLite; --storage URL puts it elsewhere), one
                                per budget cost: <name>.<cost>
    candidates/start/           the starting student's ONNX file and costs.json
    candidates/trialK/          candidate K's ONNX file (the file its size and latency are of)
    chosen_recipe.yaml          the chosen candidate's recipe, ready for `stillroom distill`
    final/start-seedS/          the starting recipe (teacher, scratch and distilled student)
    final/trialK-seedS/         the chosen candidate, distilled and from labels alone
    figures/pareto.png          metric against each cost, every candidate, the fronts marked
    front.md, results.json, summary.json, results.md

The study keeps the recipe's hash: --resume continues a killed search without redrawing finished
candidates (the ones it was running are marked failed), and a budget no candidate meets leaves
the study as it is: raise the budget and rerun with --resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillroom.config import (
    Recipe,
    dump_recipe,
    read_recipe_tree,
    resolve_factories,
    validate_recipe,
)
from stillroom.errors import NonFiniteLossError, StillroomError
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.tune.runs import compare_on_seeds, teacher_store
from stillroom.tune.search_costs import RUNTIMES, measure_candidate, pareto_front
from stillroom.tune.search_space import (
    COSTS,
    Budget,
    Layers,
    SearchSection,
    check_space,
    parse_budget,
    space_kinds,
    split_search,
)
from stillroom.tune.space import with_values
from stillroom.tune.study import (
    HASH_ATTR,
    all_trials,
    check_output_terms,
    check_study,
    open_storage,
    recipe_hash,
    suggest,
    trial_seconds,
)

SAMPLE = 256
"""Validation rows an export is parity-checked on and timed with."""


@dataclass
class SearchResult:
    run_dir: Path
    metric: str
    budget: str
    limit: float
    chosen: dict[str, Any]
    front: list[dict[str, Any]]
    trials: int
    chosen_recipe: Path
    comparison: dict[str, Any] = field(default_factory=dict)


def search(
    recipe: Path | str,
    overrides: list[str] | None = None,
    run_dir: Path | str | None = None,
    *,
    budget: str | Budget,
    trials: int | None = None,
    storage: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Search the recipe's `search.space` for the student with the best validation metric inside
    `budget` ("params=N", "latency_ms=X", "size_kb=Y", or "latency_ms=50%" of the starting
    student), then compare it on the test split (see the module docstring for the run folder)."""
    from stillroom.pipeline import check_models, check_task, prepare_data
    from stillroom.runs import check_run_dir_free, prepare_run_dir, release

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    tree, source = read_recipe_tree(recipe, overrides)
    section, rest = split_search(tree, source)
    base = validate_recipe(rest, source, Recipe)
    full = validate_recipe(tree, source, Recipe)
    resolve_factories(base, recipe)
    kinds = space_kinds(section, base, source)
    check_space(section, kinds, rest, source)
    total = trials if trials is not None else section.trials
    if total < 1:
        raise StillroomError(f"--trials ({total}) must be at least 1")
    if base.teacher.store is not None:
        raise StillroomError(
            f"{source}: search computes the teacher's store itself (in the run folder); drop "
            "teacher.store (teacher.checkpoint reuses a trained teacher)"
        )
    check_output_terms(base, source, "search")
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / base.name
    ident, name = recipe_hash(tree), f"{base.name}.{budget.cost}"
    if storage is not None:  # checked before the run folder exists: a bad URL writes nothing
        check_study(open_storage(storage), name, ident)
    check_run_dir_free(run_dir, resume, force)
    splits, student_train = prepare_data(base)
    check_task(base, splits.train.task)
    check_models(base, splits, None)
    prepare_run_dir(run_dir, full, resume, force, (base.teacher.checkpoint,))
    try:
        return _search_in(
            run_dir, base, rest, source, section, kinds, total, budget, storage, ident, name,
            splits, student_train, resume, progress,
        )  # fmt: skip
    finally:
        release(run_dir)


def draw(trial: Any, name: str, param: Any, kind: str) -> Any:
    """The trial's value for one field of the space (a layers field: a depth and a width)."""
    if isinstance(param, Layers):
        depth = trial.suggest_int(f"{name}.depth", *param.depth)
        width = trial.suggest_int(f"{name}.width", *param.width, log=param.log)
        return param.widths(depth, width)
    return suggest(trial, name, param.model_dump(), kind)


def decode(params: dict[str, Any], section: SearchSection) -> dict[str, Any]:
    """A finished trial's drawn values as recipe field values."""
    values: dict[str, Any] = {}
    for name, param in section.space.items():
        if isinstance(param, Layers):
            values[name] = param.widths(params[f"{name}.depth"], params[f"{name}.width"])
        elif param.choices is not None:
            values[name] = json.loads(params[name])
        else:
            values[name] = params[name]
    return values


def _start_params(section: SearchSection, kinds: dict[str, str], base: Recipe) -> dict | None:
    """The starting student as Optuna params, when the space can draw it (it is then the first
    candidate, measured and trained like every other); None when it cannot."""
    current = base.student.model_dump(mode="json")
    params: dict[str, Any] = {}
    for name, param in section.space.items():
        value = current[name.removeprefix("student.")]
        if isinstance(param, Layers):
            depth, width = len(value), value[0] if value else 0
            fits = param.depth[0] <= depth <= param.depth[1]
            fits = fits and param.width[0] <= width <= param.width[1]
            if not fits or param.widths(depth, width) != value:
                return None
            params |= {f"{name}.depth": depth, f"{name}.width": width}
        elif kinds[name] == "choices":
            if value not in (param.choices or []):
                return None
            params[name] = json.dumps(value)
        elif not param.low <= value <= param.high:  # type: ignore[operator]
            return None
        else:
            params[name] = value
    return params


def _search_in(
    run_dir: Path,
    base: Recipe,
    rest: dict[str, Any],
    source: str,
    section: SearchSection,
    kinds: dict[str, str],
    total: int,
    budget: Budget,
    storage: str | None,
    ident: str,
    name: str,
    splits: Any,
    student_train: Any,
    resume: bool,
    progress: bool,
) -> SearchResult:
    import optuna
    import torch

    from stillroom.cli.common import console
    from stillroom.data import make_loader
    from stillroom.pipeline import build_seeded
    from stillroom.store import StoreTeacher
    from stillroom.train import distill
    from stillroom.train.evaluate import METRICS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    store = teacher_store(
        run_dir, base, splits, student_train, progress, resume, command="stillroom search"
    )
    task = splits.train.task
    metric, way = METRICS[task]
    maximize = way == "max"
    shape, outputs = splits.train.input_shape, splits.train.num_outputs
    sample = torch.as_tensor(splits.val.inputs[:SAMPLE])

    def measure(model: Any, folder: Path) -> dict[str, Any]:
        return measure_candidate(
            model,
            folder,
            sample,
            batch=section.batch,
            repeats=section.repeats,
            threads=section.threads,
            runtime=section.runtime,
            onnx=section.onnx,
        )

    start_costs = _start_costs(run_dir, base, shape, outputs, measure)
    limit = budget.resolved(start_costs)
    cost_key = COSTS[budget.cost].key

    url = storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    rdb = open_storage(url)
    check_study(rdb, name, ident)
    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        directions=["maximize" if maximize else "minimize", "minimize"],
        load_if_exists=True,
    )
    study.set_user_attr(HASH_ATTR, ident)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # the run folder is ours (locked): a trial still "running" belongs to a killed process
        rdb.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    drawn = len(all_trials(study))
    start_params = _start_params(section, kinds, base)
    if drawn == 0 and start_params is not None:
        study.enqueue_trial(start_params, user_attrs={"starting_student": True})
        family = section.space.get("student.kind")
        for kind in family.choices or [] if family is not None else []:
            if kind != base.student.kind:  # each family measured once, whatever NSGA-II draws
                study.enqueue_trial({**start_params, "student.kind": json.dumps(kind)})
    # a resumed study draws on from a new seed: the same seed would propose the same values again
    study = optuna.load_study(
        study_name=name,
        storage=rdb,
        sampler=optuna.samplers.NSGAIISampler(
            population_size=section.population, seed=base.seed * 1000 + drawn
        ),
    )
    teacher = StoreTeacher(store)
    val_loader = make_loader(splits.val, 512, shuffle=False)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        values = {n: draw(trial, n, p, kinds[n]) for n, p in section.space.items()}
        recipe = validate_recipe(with_values(rest, values), source, Recipe)
        args = recipe.train_args(
            recipe.distill,
            task,
            epochs=section.epochs,
            progress=False,
            description=f"candidate {trial.number + 1}",
        )
        spec = recipe.student.spec()
        student = build_seeded(spec, shape, outputs, base.seed)
        result = distill(
            teacher,
            student,
            make_loader(student_train, recipe.data.batch_size, shuffle=True),
            val_loader,
            args=args,
        )
        assert result.best_value is not None
        costs = measure(result.student, run_dir / "candidates" / f"trial{trial.number + 1}")
        trial.set_user_attr("costs", costs)
        trial.set_user_attr("spec", spec)
        return result.best_value, costs[cost_key]

    def show(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not progress:
            return
        done = _complete(study)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            c = trial.user_attrs["costs"]
            state = (
                f"val {trial.values[0]:.4f}, {c['parameters']:,} params, {c['size_kb']:.1f} KB, "
                f"{c['latency_ms']:.4f} ms ({section.runtime}, batch 1)"
            )
        else:
            state = trial.state.name.lower()
        inside = [t for t in done if t.values[1] <= limit]
        best = (
            f"best inside {budget.text()} so far {_best(inside, maximize).values[0]:.4f} "
            f"(trial {_best(inside, maximize).number + 1})"
            if inside
            else f"none inside {budget.text()} yet"
        )
        console.print(
            f"candidate {trial.number + 1} ({len(done)} of {total} done): {state}; "
            f"{_shown(trial.params, section)}; {best}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    remaining = total - len(_complete(study))
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            callbacks=[
                optuna.study.MaxTrialsCallback(total, states=(optuna.trial.TrialState.COMPLETE,)),
                show,
            ],
            catch=(NonFiniteLossError,),  # a shape that diverges fails; the search goes on
        )
    study_seconds = time.perf_counter() - started

    rows = [_row(t, section) for t in _complete(study)]
    if not rows:
        raise StillroomError("no candidate finished; widen search.space or rerun with --resume")
    front = pareto_front(rows, cost_key, maximize)
    from stillroom.tune.search_pictures import write_search_figures

    inside = [r for r in rows if r["costs"][cost_key] <= limit]
    chosen = (
        max(inside, key=lambda r: (r["value"] if maximize else -r["value"], -_c(r, cost_key)))
        if inside
        else None
    )
    if chosen is None:
        smallest = min(rows, key=lambda r: r["costs"][cost_key])
        raise StillroomError(
            f"no candidate meets --budget {budget.text()} ({_cost(limit, budget.cost)}): the "
            f"smallest {budget.cost} reached is {_cost(smallest['costs'][cost_key], budget.cost)} "
            f"(trial {smallest['number']}); the study's {len(rows)} candidates are kept in "
            f"{run_dir}: rerun with a larger --budget and --resume (none is trained again), or "
            "add smaller students to search.space"
        )
    figures = write_search_figures(
        rows, run_dir / "figures", budget.cost, limit, start_costs, metric, maximize, chosen
    )
    payload: dict[str, Any] = {
        "objective": f"validation {metric} of each candidate after {section.epochs} epochs "
        f"(never the test split) against {budget.cost}",
        "higher_is_better": maximize,
        "budget": budget.text(),
        "limit": limit,
        "cost": budget.cost,
        "study_name": name,
        "storage": url if storage else "study.db",
        "start_costs": start_costs,
        "study_seconds_this_call": round(study_seconds, 1),
        "trial_seconds_total": round(sum(trial_seconds(t) for t in _complete(study)), 1),
        "candidates": rows,
        "front": [r["number"] for r in front],
        "figures": [p.name for p in figures],
    }
    atomic_write_text(run_dir / "front.md", front_table(front, budget, limit, metric) + "\n")
    chosen_tree = with_values(rest, chosen["values"])
    chosen_tree["name"] = f"{base.name}_searched"
    chosen_recipe = validate_recipe(chosen_tree, f"{source} (chosen candidate)", Recipe)
    atomic_write_text(run_dir / "chosen_recipe.yaml", dump_recipe(chosen_recipe))
    comparison = compare_on_seeds(
        run_dir,
        rest,
        chosen_tree,
        f"trial{chosen['number']}",
        base.seed,
        section.seeds,
        metric,
        tuned_baseline=True,
    )
    result = SearchResult(
        run_dir=run_dir,
        metric=metric,
        budget=budget.text(),
        limit=limit,
        chosen=chosen,
        front=front,
        trials=len(rows),
        chosen_recipe=run_dir / "chosen_recipe.yaml",
        comparison=comparison,
    )
    payload |= {"chosen": chosen["number"], "comparison": comparison}
    atomic_write_json(run_dir / "results.json", payload)
    from stillroom.results import write_summary
    from stillroom.tune.search_summary import search_summary

    write_summary(search_summary(base, chosen_recipe, payload, front, chosen), run_dir)
    return result


def _start_costs(
    run_dir: Path, base: Recipe, shape: tuple, outputs: int, measure: Any
) -> dict[str, Any]:
    """The starting student's costs (they do not depend on its weights), measured once per run
    folder, so a resumed search resolves a relative budget to the same limit."""
    from stillroom.pipeline import build_seeded

    path = run_dir / "candidates" / "start" / "costs.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = build_seeded(base.student.spec(), shape, outputs, base.seed)
    measure(model, path.parent)  # untimed: the process's first export and session run slower
    costs = measure(model, path.parent)
    atomic_write_json(path, costs)
    return costs


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _best(trials: list[Any], maximize: bool) -> Any:
    return max(trials, key=lambda t: t.values[0] if maximize else -t.values[0])


def _c(row: dict[str, Any], key: str) -> float:
    return row["costs"][key]


def _row(trial: Any, section: SearchSection) -> dict[str, Any]:
    return {
        "number": trial.number + 1,
        "value": trial.values[0],
        "values": decode(trial.params, section),
        "spec": trial.user_attrs["spec"],
        "costs": trial.user_attrs["costs"],
        "starting_student": bool(trial.user_attrs.get("starting_student")),
        "seconds": round(trial_seconds(trial), 2),
    }


def _shown(params: dict[str, Any], section: SearchSection) -> str:
    try:
        values = decode(params, section)
    except KeyError:  # a failed trial may stop before drawing every field
        return ""
    return ", ".join(f"{k.removeprefix('student.')}={json.dumps(v)}" for k, v in values.items())


def _cost(value: float, cost: str) -> str:
    unit = COSTS[cost].unit
    return f"{value:,.0f} parameters" if cost == "params" else f"{value:.4g} {unit}"


def front_table(front: list[dict[str, Any]], budget: Budget, limit: float, metric: str) -> str:
    """The Pareto front as markdown, cheapest first: every cost measured for each candidate."""
    if not front:
        return "Pareto front: no candidate finished"
    first = front[0]["costs"]
    batch = first["batch"]
    timed = [(f"{r}_ms", f"{r}_ms_batch_{batch}") for r in RUNTIMES if f"{r}_ms" in first]
    heads = [f"{RUNTIMES[k.removesuffix('_ms')]} ms b{b}" for k, _ in timed for b in (1, batch)]
    lines = [
        f"Pareto front: validation {metric} against {budget.cost} (budget {budget.text()}, "
        f"limit {_cost(limit, budget.cost)}); latency: median ms, {first['threads']} thread(s); "
        f"size: {first['file']}",
        "",
        f"| trial | student | val {metric} | parameters | KB | {' | '.join(heads)} | inside |",
        "|---|---|---|---|---|" + "---|" * len(heads) + "---|",
    ]
    key = COSTS[budget.cost].key
    for row in front:
        c = row["costs"]
        student = _student(row["spec"]) + (" (start)" if row["starting_student"] else "")
        times = " | ".join(f"{c[one]:.4f} | {c[many]:.3f}" for one, many in timed)
        lines.append(
            f"| {row['number']} | {student} | {row['value']:.4f} | {c['parameters']:,} | "
            f"{c['size_kb']:.1f} | {times} | {'yes' if c[key] <= limit else 'no'} |"
        )
    return "\n".join(lines)


def _student(spec: dict[str, Any]) -> str:
    from stillroom.results import describe

    return describe(spec)


__all__ = ["SearchResult", "search"]
