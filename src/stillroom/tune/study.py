"""`stillroom tune RECIPE --trials N`: an Optuna study over the recipe's `tune.space`.

    recipe -> teacher (trained once, or given) -> one soft-target store over the training set
           -> N trials: each a student distilled from the store with the trial's values, scored
              on the validation split, pruned from its per-epoch validation values
           -> best_recipe.yaml -> starting and tuned recipes retrained on `tune.seeds` seeds,
              compared on the test split (mean +- std)

Run folder:
    config.yaml               the resolved recipe, tune section included
    teacher/, store/          the teacher and its soft-target store, computed once
    study.db                  the Optuna study (SQLite; --storage URL puts it elsewhere)
    best_recipe.yaml          the best trial's recipe, ready for `stillroom distill`
    final/start-seedS/        the starting recipe, a classic run per seed
    final/trialK-seedS/       the best trial's recipe (trial K) on the same seed and teacher
    figures/                  history.png, importances.png, temperature_alpha.png
    results.json, summary.json, results.md

The study is named after the recipe and keeps the recipe's hash: a killed `tune` continues with
--resume (finished trials are kept, the ones it was running are marked failed and redrawn), and
--workers K runs K processes against the one storage.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
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
from stillroom.tune.space import (
    Param,
    TuneSection,
    check_bounds,
    field_kinds,
    split_tune,
    with_values,
)

HASH_ATTR = "stillroom_recipe_hash"


@dataclass
class TrialJob:
    """Everything a trial process needs (plain values: it crosses a spawn boundary)."""

    tree: dict[str, Any]
    source: str
    space: dict[str, dict[str, Any]]
    kinds: dict[str, str]
    storage: str
    study_name: str
    total: int
    store: str
    seed: int
    progress: bool


@dataclass
class TuneResult:
    run_dir: Path
    metric: str
    best_params: dict[str, Any]
    best_value: float
    trials: int
    pruned: int
    best_recipe: Path
    comparison: dict[str, Any] = field(default_factory=dict)


def recipe_hash(tree: dict[str, Any]) -> str:
    """The study's identity: the recipe with its tune (or search) section, less the trial count
    (which --trials may raise on a resume)."""
    ident = json.loads(json.dumps(tree, sort_keys=True, default=str))
    for key in ("tune", "search"):
        if isinstance(ident.get(key), dict):
            ident[key].pop("trials", None)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def open_storage(url: str) -> Any:
    """An Optuna RDB storage, or one line naming the URL and why it cannot be opened."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # sqlalchemy raises many types: an unknown dialect, a bad path, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(
            f"cannot open the study storage {url!r}: {reason}; give an Optuna storage URL such "
            "as sqlite:///path/study.db"
        ) from None


def check_study(storage: Any, name: str, ident: str) -> None:
    """Refuse a study of the same name made by a different recipe (it is left as it is)."""
    import optuna

    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name and summary.user_attrs.get(HASH_ATTR) != ident:
            raise StillroomError(
                f"the storage holds a study {name!r} made by a different recipe (its recipe hash "
                f"{summary.user_attrs.get(HASH_ATTR)}, this one {ident}); it is left untouched: "
                "use the same recipe, another name:, or another --storage"
            )


def tune(
    recipe: Path | str,
    overrides: list[str] | None = None,
    run_dir: Path | str | None = None,
    *,
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Tune the recipe's `tune.space` with Optuna and compare the best recipe with the starting
    one on `tune.seeds` seeds (see the module docstring for the run folder)."""
    from stillroom.pipeline import check_models, check_task, prepare_data
    from stillroom.runs import check_run_dir_free, prepare_run_dir, release

    tree, source = read_recipe_tree(recipe, overrides)
    section, rest = split_tune(tree, source)
    base = validate_recipe(rest, source, Recipe)
    full = validate_recipe(tree, source, Recipe)
    resolve_factories(base, recipe)
    kinds = field_kinds(section.space, base, source)
    check_bounds(section.space, kinds, rest, source)
    total = trials if trials is not None else section.trials
    if total < 1 or workers < 1:
        raise StillroomError(f"--trials ({total}) and --workers ({workers}) must be at least 1")
    if base.teacher.store is not None:
        raise StillroomError(
            f"{source}: tune computes the teacher's store itself (in the run folder); drop "
            "teacher.store (teacher.checkpoint reuses a trained teacher)"
        )
    check_output_terms(base, source)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"{base.name}"
    ident = recipe_hash(tree)
    if storage is not None:  # checked before the run folder exists: a bad URL writes nothing
        check_study(open_storage(storage), base.name, ident)
    check_run_dir_free(run_dir, resume, force)
    splits, student_train = prepare_data(base)
    check_task(base, splits.train.task)
    check_models(base, splits, None)
    prepare_run_dir(run_dir, full, resume, force, (base.teacher.checkpoint,))
    try:
        return _tune_in(
            run_dir,
            base,
            rest,
            source,
            section,
            kinds,
            total,
            workers,
            storage,
            ident,
            splits,
            student_train,
            resume,
            progress,
        )
    finally:
        release(run_dir)


def check_output_terms(recipe: Recipe, source: str, command: str = "tune") -> None:
    from stillroom.objective import tapped_layers

    if tapped_layers(list(recipe.train_args(recipe.distill, "classification").terms))[1]:
        raise StillroomError(
            f"{source}: {command} trains every trial from the teacher's stored outputs, and a "
            f"term reads teacher layers live; {command} a recipe with output terms only"
        )


def _tune_in(
    run_dir: Path,
    base: Recipe,
    rest: dict[str, Any],
    source: str,
    section: TuneSection,
    kinds: dict[str, str],
    total: int,
    workers: int,
    storage: str | None,
    ident: str,
    splits: Any,
    student_train: Any,
    resume: bool,
    progress: bool,
) -> TuneResult:
    import optuna

    from stillroom.train.evaluate import METRICS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    store = teacher_store(run_dir, base, splits, student_train, progress, resume)
    url = storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    rdb = open_storage(url)
    check_study(rdb, base.name, ident)
    task = splits.train.task
    metric, way = METRICS[task]
    study = optuna.create_study(
        study_name=base.name,
        storage=rdb,
        direction="maximize" if way == "max" else "minimize",
        load_if_exists=True,
    )
    study.set_user_attr(HASH_ATTR, ident)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # the run folder is ours (locked): a trial still "running" belongs to a killed process
        rdb.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    job = TrialJob(
        tree=rest,
        source=source,
        space={name: p.model_dump() for name, p in section.space.items()},
        kinds=kinds,
        storage=url,
        study_name=base.name,
        total=total,
        store=str(store),
        seed=base.seed,
        progress=progress,
    )
    tune_settings = section.model_dump(exclude={"space"})
    spawned = []
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        spawned = [
            context.Process(target=optimize, args=(job, tune_settings, k))
            for k in range(1, workers)
        ]
        for process in spawned:
            process.start()
    try:
        optimize(job, tune_settings, 0)
    finally:
        for process in spawned:
            process.join()
    study_seconds = time.perf_counter() - started
    bad = [p.exitcode for p in spawned if p.exitcode != 0]
    if bad:
        raise StillroomError(
            f"{len(bad)} worker process(es) failed (exit {bad}); rerun with --resume"
        )

    finished = finished_trials(study)
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise StillroomError("no trial finished; widen tune.space or lower tune.startup_trials")
    best = study.best_trial
    best_values = decode(best.params, job.space, kinds)
    best_tree = with_values(rest, best_values)
    best_tree["name"] = f"{base.name}_tuned"
    best_recipe = validate_recipe(best_tree, f"{source} (best trial)", Recipe)
    atomic_write_text(run_dir / "best_recipe.yaml", dump_recipe(best_recipe))

    from stillroom.tune.pictures import write_study_figures

    figures = write_study_figures(study, run_dir / "figures", job.space, kinds, metric)
    comparison = compare_on_seeds(
        run_dir, rest, best_tree, f"trial{best.number + 1}", base.seed, section.seeds, metric
    )
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in finished)
    result = TuneResult(
        run_dir=run_dir,
        metric=metric,
        best_params=best_values,
        best_value=float(best.value),
        trials=len(finished),
        pruned=pruned,
        best_recipe=run_dir / "best_recipe.yaml",
        comparison=comparison,
    )
    payload = {
        **{k: v for k, v in asdict(result).items() if k not in ("run_dir", "best_recipe")},
        "objective": f"best validation {metric} of the distilled student (never the test split)",
        "higher_is_better": way == "max",
        "study_name": base.name,
        "storage": url if storage else "study.db",
        "workers": workers,
        "study_seconds_this_call": round(study_seconds, 1),
        "trial_seconds_total": round(sum(trial_seconds(t) for t in finished), 1),
        "trial_list": [_trial_row(t, job.space, kinds) for t in all_trials(study)],
        "figures": [p.name for p in figures],
    }
    atomic_write_json(run_dir / "results.json", payload)
    from stillroom.results import write_summary
    from stillroom.tune.summary import tune_summary

    write_summary(tune_summary(base, best_recipe, payload, comparison, way == "max"), run_dir)
    return result


def suggest(trial: Any, name: str, param: dict[str, Any], kind: str) -> Any:
    """The trial's value for one field. Choices are offered as their JSON text: Optuna's
    categorical values are scalars, a choice may be a list of widths."""
    if kind == "choices":
        return json.loads(
            trial.suggest_categorical(name, [json.dumps(c) for c in param["choices"]])
        )
    if kind == "int":
        step = int(param["step"] or 1)
        return trial.suggest_int(
            name, int(param["low"]), int(param["high"]), step=step, log=param["log"]
        )
    return trial.suggest_float(
        name, param["low"], param["high"], step=param["step"], log=param["log"]
    )


def decode(params: dict[str, Any], space: dict[str, dict[str, Any]], kinds: dict[str, str]) -> dict:
    return {
        name: json.loads(value) if kinds[name] == "choices" else value
        for name, value in params.items()
        if name in space
    }


def optimize(job: TrialJob, settings: dict[str, Any], worker: int) -> None:
    """One process's share of the study: trials until `job.total` have finished."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from stillroom.cli.common import console
    from stillroom.data import make_loader
    from stillroom.pipeline import build_seeded, prepare_data
    from stillroom.store import StoreTeacher
    from stillroom.train import distill

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = validate_recipe(job.tree, job.source, Recipe)
    splits, student_train = prepare_data(base)
    task = splits.train.task
    teacher = StoreTeacher(job.store)
    val_loader = make_loader(splits.val, 512, shuffle=False)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=settings["startup_trials"], n_warmup_steps=settings["warmup_epochs"]
        )
        if settings["pruner"] == "median"
        else optuna.pruners.NopPruner()
    )
    rdb = open_storage(job.storage)
    # a resumed study draws on from a new seed: the same seed would propose the same values again
    drawn = len(all_trials(optuna.load_study(study_name=job.study_name, storage=rdb)))
    study = optuna.load_study(
        study_name=job.study_name,
        storage=rdb,
        sampler=optuna.samplers.TPESampler(
            seed=job.seed * 1000 + worker * 100 + drawn,
            n_startup_trials=settings["startup_trials"],
        ),
        pruner=pruner,
    )
    done = len(finished_trials(study))
    if done >= job.total:
        return

    def objective(trial: optuna.Trial) -> float:
        values = {
            name: suggest(trial, name, job.space[name], job.kinds[name]) for name in job.space
        }
        trial.set_user_attr("worker", worker)
        recipe = validate_recipe(with_values(job.tree, values), job.source, Recipe)
        args = recipe.train_args(
            recipe.distill, task, progress=False, description=f"trial {trial.number + 1}"
        )
        spec = recipe.student.spec()
        student = build_seeded(spec, splits.train.input_shape, splits.train.num_outputs, base.seed)

        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        result = distill(
            teacher,
            student,
            make_loader(student_train, recipe.data.batch_size, shuffle=True),
            val_loader,
            args=args,
            report=report,
        )
        assert result.best_value is not None
        return result.best_value

    def show(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not job.progress:
            return
        finished = len(finished_trials(study))
        state = {
            TrialState.COMPLETE: f"val {trial.value:.4f}",
            TrialState.PRUNED: f"pruned at epoch {trial.user_attrs.get('pruned_at_epoch', '?')}",
        }.get(trial.state, trial.state.name.lower())
        try:
            best = f"best so far {study.best_value:.4f} (trial {study.best_trial.number + 1})"
        except ValueError:
            best = "no trial finished yet"
        shown = ", ".join(
            f"{k}={_short(v)}" for k, v in decode(trial.params, job.space, job.kinds).items()
        )
        console.print(
            f"trial {trial.number + 1} ({finished} of {job.total} done): {state}; {shown}; {best}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    study.optimize(
        objective,
        n_trials=job.total - done,
        callbacks=[
            MaxTrialsCallback(job.total, states=(TrialState.COMPLETE, TrialState.PRUNED)),
            show,
        ],
        catch=(
            NonFiniteLossError,
        ),  # lr too high for these values: the trial fails, the study goes on
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def all_trials(study: Any) -> list[Any]:
    return study.get_trials(deepcopy=False)


def finished_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_seconds(trial: Any) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _trial_row(trial: Any, space: dict[str, dict[str, Any]], kinds: dict[str, str]) -> dict:
    return {
        "number": trial.number + 1,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": decode(trial.params, space, kinds),
        "epochs": len(trial.intermediate_values),
        "seconds": round(trial_seconds(trial), 2),
    }


__all__ = ["Param", "TuneResult", "TuneSection", "tune"]
