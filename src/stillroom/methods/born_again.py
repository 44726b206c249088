"""`method: born_again`: a chain of generations, each trained student the teacher of the next.

    gen-0 (the recipe's teacher: trained from labels, or teacher.checkpoint) -> gen-1 -> ... -> gen-N

Equal sizes are born-again networks (Furlanello et al. 2018, arXiv:1805.04770), shrinking ones a
teacher-assistant chain (Mirzadeh et al. 2020, arXiv:1902.03393); the chain itself is
`stillroom.methods.chain.distill_chain`. Beside it, each distinct generation architecture is
trained on labels alone (the baseline every generation is compared with).

Run folder (`stillroom distill recipes/digits_born_again.yaml`):
    config.yaml               the resolved recipe
    gen-0/ ... gen-N/         model.json + model.safetensors, the loop's files (metrics.jsonl,
                              checkpoints/, best.safetensors, train_args.json), done.json (last)
    scratch-gen-K/            the architecture first used by generation K, on labels alone
    results.json, results.md  test metric, parameters, size, latency, agreement with the model's
                              own teacher and with gen-0, gap closed against the same-size scratch

`--resume` skips every stage whose done.json exists and continues a started one from its
checkpoints. Generations that are not complete yet may change on resume (lower the lr of the one
that diverged, or append generations); everything else must match the run's config.yaml.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader

from stillroom.config import (
    DataSection,
    DistillSection,
    ModelSection,
    RecipeBase,
    TeacherSection,
    check_student_trains,
    dump_recipe,
)
from stillroom.data import labelled_only, make_loader
from stillroom.errors import StillroomError
from stillroom.io import atomic_write_json, atomic_write_text
from stillroom.measure import model_costs
from stillroom.methods.chain import (
    distill_chain,
    evaluate_on_test,
    failing_stage,
    is_complete,
    mark_complete,
)
from stillroom.models import build_model, load_model, save_model
from stillroom.objective import check_layer_names, tapped_layers
from stillroom.pipeline import (
    build_seeded,
    check_task,
    load_fitting,
    prepare_data,
    train_phase,
    train_teacher,
)
from stillroom.results import ModelResult, Summary, describe, write_summary
from stillroom.runs import (
    SAFE_ON_RESUME,
    clean_temporary,
    gap_closed,
    hold,
    prepare_run_dir,
    release,
    write_marker,
)
from stillroom.threads import use_threads
from stillroom.train import predict
from stillroom.train.evaluate import METRICS, is_better


class GenerationSection(ModelSection):
    """One generation's student: its architecture and, optionally, its own training settings."""

    epochs: int | None = Field(None, ge=1, description="default: distill.epochs")
    lr: float | None = Field(None, gt=0, description="default: distill.lr")
    alpha: float | None = Field(None, ge=0, le=1, description="default: distill.alpha")
    temperature: float | None = Field(None, gt=0, description="default: distill.temperature")

    def overrides(self) -> dict[str, Any]:
        """The distill settings this generation changes."""
        given = {
            "epochs": self.epochs,
            "lr": self.lr,
            "alpha": self.alpha,
            "temperature": self.temperature,
        }
        return {key: value for key, value in given.items() if value is not None}


class ChainRecipe(RecipeBase):
    """A chain: the teacher is generation 0, `generations` lists the students 1..N in order."""

    method: Literal["born_again"] = Field(
        "born_again", description="a chain: each trained generation teaches the next"
    )
    name: str = "digits_born_again"
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    generations: list[GenerationSection] = Field(
        description="the students of generations 1..N, each distilled from the one before; equal "
        "sizes: born-again networks; shrinking sizes: a teacher-assistant chain"
    )
    distill: DistillSection = DistillSection()
    baseline: bool = Field(
        True, description="also train each distinct generation architecture on labels alone"
    )
    absent: ClassVar[dict[str, str]] = {
        "student": "a born_again recipe names its students in 'generations'; remove the "
        "'student' section"
    }

    @field_validator("generations")
    @classmethod
    def _not_empty(cls, generations: list[GenerationSection]) -> list[GenerationSection]:
        if not generations:
            raise ValueError(
                "a chain needs at least one generation, e.g. generations: [{kind: mlp, hidden: [64]}]"
            )
        for generation in generations:
            check_student_trains(generation)
        return generations


@dataclass
class ChainResult:
    run_dir: Path
    task: str
    metric: str
    rows: dict[str, dict[str, Any]]
    """gen-0 .. gen-N, then scratch-gen-K: architecture, test metric, costs, agreements, gap closed."""


def _arch_key(section: ModelSection) -> str:
    return json.dumps(section.spec(), sort_keys=True)


def _first_uses(recipe: ChainRecipe) -> dict[str, int]:
    """Architecture -> the first generation that uses it (that generation's scratch baseline)."""
    first: dict[str, int] = {}
    for k, gen in enumerate(recipe.generations, start=1):
        first.setdefault(_arch_key(gen), k)
    return first


def _check_chain(
    recipe: ChainRecipe, task: str, input_shape: tuple[int, ...], outputs: int
) -> None:
    """What can fail before generation 0 trains fails now, naming the generation."""
    if recipe.teacher.store is not None:
        raise StillroomError(
            "teacher.store: a chain computes each generation's targets from the one before; remove it"
        )
    if recipe.distill.loss == "topk_soft_target":
        raise StillroomError(
            "distill.loss=topk_soft_target needs a top-k store, which a chain does not use; "
            "use soft_target or dkd"
        )
    student_names, teacher_names = tapped_layers(
        list(recipe.train_args(recipe.distill, task).terms)
    )
    if recipe.teacher.checkpoint is not None:
        teacher, _ = load_fitting(recipe.teacher.checkpoint, input_shape, outputs)
        models = [teacher]
    else:
        models = [build_model(recipe.teacher.spec(), input_shape, outputs)]
    for k, gen in enumerate(recipe.generations, start=1):
        try:
            models.append(build_model(gen.spec(), input_shape, outputs))
            if student_names:
                check_layer_names(models[k], student_names)
            if teacher_names:
                check_layer_names(models[k - 1], teacher_names)
        except StillroomError as err:
            raise StillroomError(f"generations[{k - 1}] (generation {k}): {err}") from None


def _prepare_chain_dir(run_dir: Path, recipe: ChainRecipe, resume: bool, force: bool) -> None:
    """Claim a fresh run folder, or check a resumed one: only the generations that are not
    complete may differ from the recipe the run started with."""
    config = run_dir / "config.yaml"
    if not resume or not config.is_file():
        # also refuses a resume without a run
        prepare_run_dir(
            run_dir,
            recipe,
            resume,
            force,
            (recipe.teacher.checkpoint, recipe.teacher.store, recipe.data.path),
        )
        return
    hold(run_dir)  # one process at a time, as for every method's resume
    use_threads(recipe.threads)  # prepare_run_dir does this for a fresh run
    before, after = yaml.safe_load(config.read_text()), recipe.model_dump(mode="json")
    for key in SAFE_ON_RESUME:  # may change on resume, and "auto" is not written
        before.pop(key, None), after.pop(key, None)
    old, new = before.pop("generations", None) or [], after.pop("generations")
    complete = 0
    if is_complete(run_dir / "gen-0"):
        while complete < len(old) and is_complete(run_dir / f"gen-{complete + 1}"):
            complete += 1
    if before != after or old[:complete] != new[:complete] or len(new) < complete:
        release(run_dir)
        raise StillroomError(
            f"the recipe differs from the one {run_dir} was started with (see its config.yaml) in "
            f"more than the generations not complete yet (generations[{complete}:]); resume with "
            "the same recipe, changing only those, or start a new run folder"
        )
    for k, (was, now) in enumerate(zip_longest(old, new), start=1):
        if k > complete and was != now:
            # checkpoints made under other settings must not be continued under these
            shutil.rmtree(run_dir / f"gen-{k}", ignore_errors=True)
    write_marker(run_dir, "run", method=recipe.method)
    clean_temporary(run_dir)
    atomic_write_text(config, dump_recipe(recipe))


def run_chain(
    recipe: ChainRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> ChainResult:
    """Train (or load) generation 0, distil generations 1..N in turn, train the scratch
    baselines, write results.json/results.md. Every stage resumes (see the module docstring)."""
    run_dir = Path(run_dir)
    # everything that can be checked before any training is checked before the run folder exists
    splits, student_train = prepare_data(recipe)
    task = splits.train.task
    check_task(recipe, task)
    input_shape, num_outputs = splits.train.input_shape, splits.train.num_outputs
    _check_chain(recipe, task, input_shape, num_outputs)
    if resume and force:  # here too: the chain's resume does not pass through prepare_run_dir
        raise StillroomError("--resume and --force contradict each other; pass one")
    _prepare_chain_dir(run_dir, recipe, resume, force)
    batch = recipe.data.batch_size
    test_loader = make_loader(splits.test, 512, shuffle=False)
    meta = {"input_shape": list(input_shape), "num_outputs": num_outputs}

    # 1. generation 0, the teacher: trained on every training label, or loaded from a checkpoint
    gen0 = run_dir / "gen-0"
    with failing_stage("generation 0 (the teacher)", run_dir, "no generation is"):
        if is_complete(gen0):
            teacher = load_model(gen0)[0]
        elif recipe.teacher.checkpoint is not None:
            teacher, loaded = load_model(recipe.teacher.checkpoint)  # checked in _check_chain
            save_model(teacher, loaded["spec"], gen0, **meta)
        else:
            teacher = train_teacher(
                recipe, run_dir, splits, name="gen-0", progress=progress, resume=resume
            )
    if not is_complete(gen0):
        mark_complete(gen0, {"generation": 0, "test": evaluate_on_test(teacher, test_loader, task)})

    # 2. generations 1..N: initial weights differ per generation (seed + k), the data order does not
    students = []
    for k, gen in enumerate(recipe.generations, start=1):
        students.append(build_seeded(gen.spec(), input_shape, num_outputs, recipe.seed + k))
        folder = run_dir / f"gen-{k}"
        if not is_complete(folder):  # the architecture is known before the weights exist
            folder.mkdir(exist_ok=True)
            atomic_write_text(
                folder / "model.json", json.dumps({"spec": gen.spec(), **meta}, indent=2)
            )
    distill_chain(
        teacher,
        students,
        make_loader(student_train, batch, shuffle=True),
        make_loader(splits.val, 512, shuffle=False),
        test_loader=test_loader,
        run_dir=run_dir,
        resume=resume,
        args=[
            recipe.train_args(
                recipe.distill, task, progress=progress, description=f"gen-{k}", **gen.overrides()
            )
            for k, gen in enumerate(recipe.generations, start=1)
        ],
        cache_targets=True,
    )

    # 3. the baselines: each architecture on labels alone, initialised like its first generation
    scratch: dict[str, nn.Module] = {}
    for k in _first_uses(recipe).values() if recipe.baseline else []:
        name, gen = f"scratch-gen-{k}", recipe.generations[k - 1]
        with failing_stage(f"baseline {name}", run_dir, "all generations are"):
            if is_complete(run_dir / name):
                scratch[name] = load_model(run_dir / name)[0]
                continue
            # without a teacher only the labelled samples carry any signal
            scratch[name] = train_phase(
                name,
                run_dir,
                None,
                build_seeded(gen.spec(), input_shape, num_outputs, recipe.seed + k),
                gen.spec(),
                labelled_only(student_train),
                splits.val,
                recipe.train_args(
                    recipe.distill,
                    task,
                    **{**gen.overrides(), "alpha": 0.0, "terms": ()},
                    progress=progress,
                    description=name,
                ),
                batch,
                resume,
            )
        mark_complete(run_dir / name, {"test": evaluate_on_test(scratch[name], test_loader, task)})

    # 4. the table, from the weights on disk
    result = ChainResult(run_dir, task, METRICS[task][0], {})
    result.rows = _rows(recipe, result, [teacher, *students], scratch, test_loader, input_shape)
    write_chain_results(result)
    return result


def _rows(
    recipe: ChainRecipe,
    result: ChainResult,
    generations: list[nn.Module],
    scratch: dict[str, nn.Module],
    test_loader: DataLoader,
    input_shape: tuple[int, ...],
) -> dict[str, dict[str, Any]]:
    """Every model's test metric, costs and agreements (with its teacher, with gen-0)."""
    outputs = [predict(model, test_loader)[0] for model in generations]
    first = _first_uses(recipe)
    rows: dict[str, dict[str, Any]] = {}
    models = {f"gen-{k}": model for k, model in enumerate(generations)} | scratch
    for name, model in models.items():
        folder = result.run_dir / name
        k = int(name.removeprefix("gen-")) if name.startswith("gen-") else None
        spec = json.loads((folder / "model.json").read_text())["spec"]
        row: dict[str, Any] = {
            "architecture": describe(spec),
            "generation": k,
            "teacher": f"gen-{k - 1}" if k else None,
            **evaluate_on_test(
                model,
                test_loader,
                result.task,
                outputs[k - 1] if k else None,
                outputs[0] if k != 0 else None,
            ),
            **model_costs(model, folder / "model.safetensors", input_shape),
        }
        if k and scratch:
            row["scratch"] = f"scratch-gen-{first[_arch_key(recipe.generations[k - 1])]}"
        rows[name] = row
    for row in rows.values():
        if "scratch" in row:
            scratch_row, gen0_row = rows[row["scratch"]], rows["gen-0"]
            trio = {"teacher": gen0_row, "student_scratch": scratch_row, "student_kd": row}
            # no gap to close where the scratch student already matches gen-0
            lead = is_better(result.task, gen0_row[result.metric], scratch_row[result.metric])
            row["gap_closed"] = gap_closed(trio, result.metric) if lead else None
    return rows


def write_chain_results(result: ChainResult) -> None:
    payload = {"task": result.task, "metric": result.metric, "models": result.rows}
    atomic_write_json(result.run_dir / "results.json", payload)
    write_summary(summarize(result), result.run_dir)


def summarize(result: ChainResult) -> Summary:
    """Every generation (gen-0 is the teacher), then the scratch students of each architecture."""
    models = []
    for name, row in result.rows.items():
        role = "baseline" if name.startswith("scratch") else "generation"
        models.append(
            ModelResult(
                name=name,
                role="teacher" if name == "gen-0" else role,  # type: ignore[arg-type]
                metrics={
                    result.metric: row[result.metric],
                    "agreement_teacher": row.get("agreement_teacher"),
                    "agreement_gen0": row.get("agreement_gen0"),
                    "gap_closed": row.get("gap_closed"),
                },
                folder=name,
                parameters=row["parameters"],
                size_bytes=row["size_bytes"],
                latency_ms=row["latency_ms"],
                architecture=row["architecture"],
                teacher=row["teacher"] or "",
            )
        )
    generations = [m.name for m in models if m.role == "generation"]
    return Summary(
        method="born_again",
        title=f"generations: test {result.metric} ({result.run_dir.name})",
        task=result.task,
        metric=result.metric,
        higher_is_better=METRICS[result.task][1] == "max",
        models=models,
        notes=[
            "gap_closed = (generation - scratch) / (gen-0 - scratch), the scratch student having "
            "the generation's architecture (- where gen-0 does not lead it); agreement: share of "
            "test samples with the same top-1 class as the model's teacher / gen-0"
        ],
        primary=generations[-1] if generations else None,
    )
