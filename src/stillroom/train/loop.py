"""The one distillation loop. Read `distill` top to bottom: it is the whole training procedure.

    loss = alpha * distillation(student(x), teacher(x), T) + (1 - alpha) * hard_label(student(x), y)

Built on Accelerate, so device placement, mixed precision, gradient accumulation and
`accelerate launch` multi-GPU runs use the same code. Randomness is re-seeded at every epoch start
from (seed, epoch) and the data order comes from a seeded sampler, so a run resumed from its last
checkpoint reaches the same weights as one that was never interrupted.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from stillroom.data.loaders import SeededBatches
from stillroom.dist import world_size
from stillroom.errors import INTERRUPTED_AT, NonFiniteLossError, StillroomError
from stillroom.io import atomic_save_tensors, atomic_write_json
from stillroom.objective import (
    ObjectiveStudent,
    StepOutputs,
    Term,
    TermSpec,
    build_objective,
    classic_terms,
    needs_example,
)
from stillroom.taps import Taps
from stillroom.teachers import FrozenTeacher, Teacher, as_teacher
from stillroom.train.args import TrainArgs
from stillroom.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from stillroom.train.critics import Critics
from stillroom.train.evaluate import METRICS, evaluate, is_better
from stillroom.train.logging import MetricsLog

BEST = "best.safetensors"
STATUS_EVERY = 25  # batches between refreshes of the bar's running loss

BatchTransform = Callable[[Any, Any, Any, nn.Module, int], tuple[Any, Any, Any]]
"""(inputs, targets, index, student, batch) -> (inputs, targets, index): rewrites a training batch
before its step (batch counts training batches from 0 over the whole run, resumes included), e.g.
on-policy distillation replacing continuations with ones the student samples."""


@dataclass
class DistillResult:
    """What a run produced. `student` holds the best checkpoint's weights (by validation metric)."""

    student: nn.Module
    history: list[dict[str, Any]]
    metric: str
    best_epoch: int
    best_value: float | None
    stopped_early: bool
    run_dir: Path | None


@dataclass
class RunState:
    """Where a run stands: saved in every checkpoint's state.json, restored on resume."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps
    batches: int = 0  # training batches, micro-batches under gradient accumulation
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    # the best student's weights when there is no run folder to write best.safetensors to
    best_weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RunState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def finish_epoch(
        self, epoch: int, value: float | None, improved: bool, patience: int | None
    ) -> None:
        """Count epoch `epoch` (0-based) done: a new best, or one more epoch without one."""
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch + 1, 0
        else:
            self.bad_epochs += 1
        self.stopped_early = patience is not None and self.bad_epochs >= patience
        self.epoch = epoch + 1

    def to_saved(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "best_weights"}


def distill(
    teacher: nn.Module | Teacher | None,
    student: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    run_dir: Path | str | None = None,
    resume: bool = False,
    args: TrainArgs | None = None,
    batch_transform: BatchTransform | None = None,
    report: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> DistillResult:
    """Train `student` to imitate `teacher` (frozen) while fitting the labels.

    Args:
        teacher: an `nn.Module` (run live, frozen), a `CachedTeacher` (precomputed outputs looked up
            by sample index), or None to train on labels alone (then alpha must be 0).
        student: any `nn.Module` mapping a batch of inputs to outputs shaped like the teacher's.
        train_loader: yields `(inputs, targets)` or `(inputs, targets, index)`; targets may be
            `IGNORE_INDEX` (classification) or NaN (regression) where a sample has no label.
        val_loader: same form; its metric picks the best checkpoint and drives early stopping.
        run_dir: where checkpoints, metrics.jsonl, TensorBoard logs and best.safetensors go.
            None keeps everything in memory (no resume).
        resume: continue from the last checkpoint in `run_dir`.
        args / overrides: a `TrainArgs`, and/or its fields as keywords (alpha=0.9, epochs=10,
            terms=[TermSpec("hint", student="net.2", teacher="head.1")], ...).
        batch_transform: called on every training batch before the step (see BatchTransform);
            it must draw its randomness from (seed, step) for resumed runs to replay exactly.
        report: called as report(epoch, val_value) after each epoch's checkpoint (epoch counts
            from 1), e.g. a tuning trial reporting to its pruner; an exception it raises (such as
            optuna.TrialPruned) stops training there and propagates.

    Returns:
        DistillResult with the student at its best validation epoch.
    """
    args = replace(args or TrainArgs(), **overrides) if overrides else (args or TrainArgs())
    if len(train_loader) == 0:
        raise StillroomError("the training loader yields no batches; the training set is empty")
    specs = _objective_specs(args, has_teacher=teacher is not None)
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_root = run_dir / "checkpoints" if run_dir else None
    _check_run_dir(run_dir, resume)

    # 1. setup: devices, the teacher, the objective's terms, optimizers
    accelerator = Accelerator(
        # several processes on a machine without an accelerator: Accelerate makes them one
        # gloo group only when told cpu=True (else each process would train alone)
        cpu=args.cpu or (world_size() > 1 and not torch.cuda.is_available()),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    frozen = as_teacher(teacher).to(accelerator.device) if teacher is not None else None
    teacher_module = frozen.module if isinstance(frozen, FrozenTeacher) else None
    # feature terms are sized from one example batch; drawing it may consume the global RNG, so
    # the seed is fixed after the draw and before projectors are initialised
    example = _unpack(next(iter(train_loader)))[0] if needs_example(specs) else None
    set_seed(args.seed)
    terms = build_objective(
        specs, args.task, student, teacher_module, example, args.outputs, args.temperature
    )
    weighted = [t for t in terms if t.weight > 0]  # weight-0 terms are only logged
    teacher_layers = list(dict.fromkeys(layer for t in weighted for layer in t.teacher_layers))
    model = ObjectiveStudent(student, weighted)
    critics = Critics(terms)  # second players (adversarial discriminators), their own optimizer
    optimizer = _build_optimizer(model, args)
    seeded = _seeded_batches(train_loader)
    if seeded is not None:  # make_loader's: the run's seed
        seeded.seed = args.seed
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    critics.to(accelerator.device)
    # One process, no fp16 loss scale, no accumulation: Accelerate's optimizer wrapper, backward
    # and accumulate add nothing then but per-step cost (accelerate 1.16 looks up the `lomo_optim`
    # package twice per optimizer step), so the step calls torch directly. Decided once, here.
    plain = (
        accelerator.distributed_type == DistributedType.NO
        and accelerator.scaler is None
        and args.grad_accum_steps == 1
    )
    step_optimizer = optimizer.optimizer if plain else optimizer
    # sized from the prepared loader: under multi-process training each process sees its shard
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler = _build_scheduler(step_optimizer, args, steps_per_epoch * args.epochs)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    inner = accelerator.unwrap_model(model)
    select, select_task = args.selected
    metric = METRICS[select_task][0] if select is None else f"{select}/{METRICS[select_task][0]}"

    run = RunState()
    checkpoint = latest_checkpoint(ckpt_root) if (resume and ckpt_root) else None
    if checkpoint is not None:
        saved = load_checkpoint(
            checkpoint,
            inner.student,
            optimizer,
            scheduler,
            inner.projectors,
            critics=critics.modules if critics else None,
            critic_optimizer=critics.optimizer,
        )
        if accelerator.scaler is not None and "grad_scaler" in saved:  # fp16 loss scale
            accelerator.scaler.load_state_dict(saved["grad_scaler"])
        run = RunState.from_saved(saved)
    log = MetricsLog(run_dir if accelerator.is_main_process else None, run.history)
    if run_dir and accelerator.is_main_process:
        atomic_write_json(run_dir / "train_args.json", args.to_dict())

    progress = _progress(args, accelerator)
    shown = not progress.disable
    task_id = progress.add_task(args.description, total=args.epochs * len(train_loader), status="")
    progress.update(task_id, completed=run.epoch * len(train_loader))
    # 2. the loop: batch -> student -> teacher -> sum of weighted terms -> step
    # closing(log): a NaN stop or Ctrl-C must not leave the TensorBoard event file open
    position: list[str] = []  # the epoch being trained, for the Ctrl-C line
    with progress, closing(log), _training_at(run_dir, position):
        for epoch in range(run.epoch, args.epochs):
            if run.stopped_early:
                break
            position[:] = [str(epoch + 1)]
            # re-seed from (seed, epoch): dropout masks and data order replay exactly after a resume
            set_seed(args.seed * 100_003 + epoch)
            train_loader.set_epoch(epoch)
            if seeded is not None:  # under several processes Accelerate's wrapper hides it
                seeded.set_epoch(epoch)
            model.train()
            started = time.perf_counter()
            # sample-weighted sums, kept on the device and read once per epoch (and per status
            # refresh when the bar is shown): a read per step would wait for the device each time
            sums = Sums(["loss", *(t.name for t in terms), *critics.names])
            for batch in train_loader:
                inputs, targets, index = _unpack(batch)
                if batch_transform is not None:  # e.g. on-policy: the student writes the batch
                    inputs, targets, index = batch_transform(
                        inputs, targets, index, inner.student, run.batches
                    )
                run.batches += 1  # per micro-batch: each draws its own randomness
                with nullcontext() if plain else accelerator.accumulate(model):
                    outputs, student_features = model(inputs)
                    step = StepOutputs(outputs, None, targets, student_features, inputs=inputs)
                    if frozen is not None:
                        step.teacher, step.teacher_features = _teacher_step(
                            frozen, teacher_layers, inputs, index
                        )
                    values = _term_values(terms, step, has_teacher=frozen is not None)
                    loss = _weighted_sum(weighted, values)
                    _check_finite(loss, values, run.step, epoch, ckpt_root)
                    if plain:
                        loss.backward()
                    else:
                        accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    step_optimizer.step()
                    if args.max_norm is not None and accelerator.sync_gradients:
                        _constrain_rows(inner.student, args.max_norm)
                    if accelerator.sync_gradients:
                        scheduler.step()
                        run.step += 1
                    step_optimizer.zero_grad(set_to_none=True)
                # the critics' turn, on this batch with the student's side held fixed
                values.update(critics.step(step, accelerator))
                sums.add(_batch_size(inputs, targets), loss=loss, **values)
                if shown:
                    batch_in_epoch = sums.batches
                    status = None
                    if batch_in_epoch % STATUS_EVERY == 1 or batch_in_epoch == len(train_loader):
                        status = f"epoch {epoch + 1} loss {sums.mean('loss'):.4f}"
                    progress.update(task_id, advance=1, **({"status": status} if status else {}))

            # 3. the epoch's end: validate, keep the best, stop early, checkpoint
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": run.step,
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": round(time.perf_counter() - started, 4),
                **{f"train/{key}": value for key, value in sums.means(accelerator).items()},
            }
            if val_loader is not None:
                scores = evaluate(inner.student, val_loader, args.outputs or args.task, accelerator)
                record.update({f"val/{k}": v for k, v in scores.items()})
            value = record.get(f"val/{metric}")
            # keep: last makes every epoch the one to return (patience is refused beside it)
            improved = (
                val_loader is None
                or args.keep == "last"
                or is_better(select_task, value, run.best_value)
            )
            run.finish_epoch(epoch, value, improved, args.patience)
            if improved and run_dir and accelerator.is_main_process:
                atomic_save_tensors(inner.student.state_dict(), run_dir / BEST)
            elif improved:  # no folder to write to (or not the main process): keep it in memory
                run.best_weights = _snapshot(inner.student)
            log.log(record)
            run.history = log.records
            if val_loader is not None:
                status = f"epoch {epoch + 1} val {metric} {value:.4f} (best {run.best_value:.4f})"
                progress.update(task_id, status=status)
            if ckpt_root and accelerator.is_main_process:
                saved = run.to_saved()
                if accelerator.scaler is not None:
                    saved["grad_scaler"] = accelerator.scaler.state_dict()
                # student and projectors (and critics): a resumed run continues them all
                save_checkpoint(
                    ckpt_root,
                    epoch + 1,
                    inner.student,
                    optimizer,
                    scheduler,
                    saved,
                    inner.projectors,
                    critics=critics.modules if critics else None,
                    critic_optimizer=critics.optimizer,
                )
            if report is not None and value is not None:
                report(epoch + 1, value)

    if run.stopped_early and accelerator.is_main_process:
        # said whether or not bars are shown: a run shorter than asked must not look finished
        progress.console.print(
            f"{args.description}: stopped early after epoch {run.epoch}: no better val {metric} "
            f"for {args.patience} epochs; keeping epoch {run.best_epoch} ({metric} "
            f"{run.best_value:.4f})",
            highlight=False,
        )
    trained = inner.student
    accelerator.wait_for_everyone()  # the main process wrote best.safetensors
    if run_dir and (run_dir / BEST).is_file():
        trained.load_state_dict(load_file(str(run_dir / BEST)))
    elif run.best_weights is not None:
        trained.load_state_dict(run.best_weights)
    return DistillResult(
        student=trained,
        history=log.records,
        metric=metric,
        best_epoch=run.best_epoch,
        best_value=run.best_value,
        stopped_early=run.stopped_early,
        run_dir=run_dir,
    )


def _objective_specs(args: TrainArgs, has_teacher: bool) -> list[TermSpec]:
    """The classic pair (when alpha is given) and the extra terms; refuse an empty objective, and
    distillation terms without a teacher."""
    specs = (
        classic_terms(args.alpha, args.temperature, args.loss, args.dkd_alpha, args.dkd_beta)
        if args.classic
        else []
    )
    specs += list(args.terms)
    if not specs:
        raise StillroomError("the objective has no terms: give alpha, or terms, or both")
    if not has_teacher and any(
        s.weight > 0 and s.kind != "hard_label" and s.source == "teacher" for s in specs
    ):
        raise StillroomError(
            f"alpha={args.alpha} (or an extra term) weights a distillation term but no teacher "
            "was given; pass a teacher, or set alpha=0 and no terms to train on labels alone"
        )
    return specs


def _term_values(
    terms: list[Term], step: StepOutputs, has_teacher: bool
) -> dict[str, torch.Tensor]:
    """Each term's value; weight-0 terms too (logged), except those needing an absent teacher."""
    values = {}
    for term in terms:
        if has_teacher or not term.needs_teacher:
            try:
                values[term.name] = term.compute(step)
            except (ValueError, RuntimeError) as err:
                # shapes the user's choice of outputs/layers cannot fit (torch raises RuntimeError)
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise StillroomError(f"term '{term.name}': {first}") from None
    return values


class Sums:
    """Sample-weighted means of the logged values over an epoch, read from the device only when
    asked (once per epoch, and per refresh of the bar's status).

    add(n, name=value, ...) keeps each 0-d tensor as it is (detached) with its batch size n;
    mean(name) stacks them: a step never waits for the device to report a number.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.sizes: dict[str, list[int]] = {name: [] for name in names}
        self.samples = 0
        self.batches = 0

    def add(self, n: int, **values: torch.Tensor) -> None:
        self.samples += n
        self.batches += 1
        for name, value in values.items():
            self.values[name].append(value.detach())
            self.sizes[name].append(n)

    def mean(self, name: str) -> float:
        values = self.values[name]
        if not values:
            return 0.0
        # float64 as the Python floats summed before (MPS has no float64)
        stacked = torch.stack(values)
        stacked = stacked.float() if stacked.device.type == "mps" else stacked.double()
        sizes = torch.tensor(self.sizes[name], dtype=stacked.dtype, device=stacked.device)
        return (stacked * sizes).sum().item() / max(self.samples, 1)

    def means(self, accelerator: Accelerator | None = None) -> dict[str, float]:
        """Every mean; given several processes' `accelerator`, over all their samples (a
        collective: every process calls it)."""
        if accelerator is None or accelerator.num_processes == 1:
            return {name: self.mean(name) for name in self.names}
        totals = [self.mean(name) * max(self.samples, 1) for name in self.names]
        summed = accelerator.reduce(
            torch.tensor([*totals, self.samples], dtype=torch.float64, device=accelerator.device),
            "sum",
        ).tolist()
        return {
            name: total / max(summed[-1], 1)
            for name, total in zip(self.names, summed[:-1], strict=True)
        }


def _weighted_sum(weighted: list[Term], values: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum(weight * value) over the weighted terms, without the ops a weight of 1 or a start at 0
    would add to every step."""
    total = None
    for term in weighted:
        value = values[term.name] if term.weight == 1 else term.weight * values[term.name]
        total = value if total is None else total + value
    assert total is not None  # the objective has at least one weighted term
    return total


def _batch_size(inputs: Any, targets: Any) -> int:
    """Samples in a batch: inputs may be a dict (tokenised text), targets a dict (multi-task)."""
    for value in (inputs, targets):
        if isinstance(value, torch.Tensor):
            return len(value)
    first = next(iter(targets.values() if isinstance(targets, dict) else inputs.values()))
    return len(first)


def _teacher_step(
    frozen: Teacher,
    layers: list[str],
    inputs: Any,
    index: torch.Tensor | None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The teacher's outputs for this batch, and its tapped features (a live teacher only)."""
    if not layers:
        return frozen(inputs, index), {}
    assert isinstance(frozen, FrozenTeacher)
    with Taps(frozen.module, layers) as taps:
        outputs = frozen(inputs, index)
        # clone out of inference mode: the loss saves these tensors for the student's backward
        features = {name: value.clone() for name, value in taps.outputs.items()}
    return outputs, features


def _seeded_batches(loader: Any) -> SeededBatches | None:
    """make_loader's batch sampler, also inside the shard wrapper Accelerate puts around it."""
    for sampler in (
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None),
    ):
        if isinstance(sampler, SeededBatches):
            return sampler
    return None


def _check_run_dir(run_dir: Path | None, resume: bool) -> None:
    """Refuse to train over an earlier run's checkpoints unless asked to resume it."""
    if run_dir is None:
        if resume:
            raise StillroomError("resume needs a run_dir holding the checkpoints to continue from")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise StillroomError(f"run folder {run_dir} exists and is a file; choose another path")
    if not resume and (run_dir / "checkpoints").exists():
        raise StillroomError(
            f"{run_dir} already holds a run; resume it, or choose a new folder "
            "(the CLI's --force replaces it)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # a stale temporary checkpoint from a crash is never resumed from; clear it
    for tmp in (run_dir / "checkpoints").glob(".epoch-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, dict):
        return batch["inputs"], batch["targets"], batch.get("index")
    if isinstance(batch, list | tuple) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise StillroomError(
        "each batch must be (inputs, targets), (inputs, targets, index) or a dict with "
        f"'inputs' and 'targets'; got {type(batch).__name__}"
    )


@contextmanager
def _training_at(run_dir: Path | None, position: list[str]) -> Iterator[None]:
    """On Ctrl-C, record the phase (the run folder's name) and the epoch in `position[0]`
    (kept current by the loop) for the CLI's line, then let the interrupt go on."""
    try:
        yield
    except KeyboardInterrupt:
        phase = run_dir.name if run_dir is not None else "training"
        INTERRUPTED_AT[:] = [f"{phase} at epoch {position[0]}" if position else phase]
        raise


def _check_finite(
    loss: torch.Tensor,
    values: dict[str, torch.Tensor],
    step: int,
    epoch: int,
    ckpt_root: Path | None,
) -> None:
    """Stop before a NaN/inf reaches the weights, naming the phase (the run folder holding
    `ckpt_root`: teacher, student_scratch, student_kd, ...), the step and the bad term."""
    if math.isfinite(loss.item()):  # one read of a 0-d tensor: cheaper than an isfinite kernel
        return
    bad = [name for name, value in values.items() if not torch.isfinite(value)]
    saved = ckpt_root is not None and (ckpt_root / "latest.json").is_file()
    where = f"the last good checkpoint is in {ckpt_root}" if saved else "no checkpoint was written"
    phase = f" in phase '{ckpt_root.parent.name}'" if ckpt_root is not None else ""
    raise NonFiniteLossError(
        f"loss term '{bad[0] if bad else 'total'}' became {loss.item()} at step {step + 1} "
        f"(epoch {epoch + 1}){phase}; {where}. Lower lr, or check the inputs/teacher outputs for NaN"
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _constrain_rows(model: nn.Module, max_norm: float) -> None:
    """Every nn.Linear's rows (a unit's incoming weights) scaled back to L2 norm <= max_norm."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(torch.renorm(module.weight, 2, 0, max_norm))


def _build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            nesterov=args.nesterov,
        )
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay to 0 over the planned steps."""
    warmup, cosine = args.warmup_steps, args.scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(args: TrainArgs, accelerator: Accelerator) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not (args.progress and accelerator.is_main_process),
        transient=False,
    )
