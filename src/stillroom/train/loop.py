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
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from stillroom.errors import NonFiniteLossError, StillroomError
from stillroom.io import atomic_save_tensors, atomic_write_json
from stillroom.losses import TopKTargets
from stillroom.objective import (
    ObjectiveStudent,
    StepOutputs,
    Term,
    build_objective,
    classic_terms,
    needs_example,
)
from stillroom.taps import Taps
from stillroom.teachers import FrozenTeacher, Teacher, as_teacher
from stillroom.train.args import TrainArgs
from stillroom.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from stillroom.train.evaluate import METRICS, evaluate, is_better
from stillroom.train.logging import MetricsLog

BEST = "best.safetensors"

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

    Returns:
        DistillResult with the student at its best validation epoch.
    """
    args = replace(args or TrainArgs(), **overrides) if overrides else (args or TrainArgs())
    if len(train_loader) == 0:
        raise StillroomError("the training loader yields no batches; the training set is empty")
    specs = (
        classic_terms(args.alpha, args.temperature, args.loss, args.dkd_alpha, args.dkd_beta)
        if args.classic
        else []
    )
    specs += list(args.terms)
    if not specs:
        raise StillroomError("the objective has no terms: give alpha, or terms, or both")
    if teacher is None and any(
        s.weight > 0 and s.kind != "hard_label" and s.source == "teacher" for s in specs
    ):
        raise StillroomError(
            f"alpha={args.alpha} (or an extra term) weights a distillation term but no teacher "
            "was given; pass a teacher, or set alpha=0 and no terms to train on labels alone"
        )
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_root = run_dir / "checkpoints" if run_dir else None
    _check_run_dir(run_dir, resume)

    accelerator = Accelerator(
        cpu=args.cpu,
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
    terms = build_objective(specs, args.task, student, teacher_module, example, args.outputs)
    teacher_layers = list(
        dict.fromkeys(layer for t in terms if t.weight > 0 for layer in t.teacher_layers)
    )
    model = ObjectiveStudent(student, [t for t in terms if t.weight > 0])
    # second players (adversarial discriminators) train in alternation, with their own optimizer
    critic_terms = [t for t in terms if t.critic is not None and t.weight > 0]
    critics = nn.ModuleList([t.critic for t in critic_terms])
    critic_optimizer = _build_critic_optimizer(critic_terms)

    optimizer = _build_optimizer(model, args)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # critics are moved, not prepared: an AcceleratedOptimizer would hold their updates until the
    # student's gradient-accumulation sync, and the terms call the bare critic, never a DDP wrapper
    critics.to(accelerator.device)
    # sized from the prepared loader: under multi-process training each process sees its shard
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler = _build_scheduler(optimizer, args, steps_per_epoch * args.epochs)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    inner = accelerator.unwrap_model(model)

    select, select_task = args.selected
    metric = METRICS[select_task][0] if select is None else f"{select}/{METRICS[select_task][0]}"
    eval_task = args.outputs or args.task
    state: dict[str, Any] = {
        "step": 0,
        "best_value": None,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
    }
    start_epoch = 0
    checkpoint = latest_checkpoint(ckpt_root) if (resume and ckpt_root) else None
    if checkpoint is not None:
        state = load_checkpoint(
            checkpoint,
            inner.student,
            optimizer,
            scheduler,
            inner.projectors,
            critics=critics if critic_terms else None,
            critic_optimizer=critic_optimizer,
        )
        if accelerator.scaler is not None and "grad_scaler" in state:  # fp16 loss scale
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        start_epoch = state["epoch"]
    log = MetricsLog(run_dir if accelerator.is_main_process else None, state["history"])
    if run_dir and accelerator.is_main_process:
        atomic_write_json(run_dir / "train_args.json", args.to_dict())

    stopped_early = state.get("stopped_early", False)
    progress = _progress(args, accelerator)
    task_id = progress.add_task(args.description, total=args.epochs * len(train_loader), status="")
    progress.update(task_id, completed=start_epoch * len(train_loader))
    # closing(log): a NaN stop or Ctrl-C must not leave the TensorBoard event file open
    with progress, closing(log):
        for epoch in range(start_epoch, args.epochs):
            if stopped_early:
                break
            # re-seed from (seed, epoch): dropout masks and data order replay exactly after a resume
            set_seed(args.seed * 100_003 + epoch)
            train_loader.set_epoch(epoch)
            model.train()
            started = time.perf_counter()
            sums = dict.fromkeys(
                ["loss", *(t.name for t in terms), *_critic_names(critic_terms)], 0.0
            )
            seen = 0
            for batch in train_loader:
                inputs, targets, index = _unpack(batch)
                if batch_transform is not None:
                    # counted per batch, not per optimizer step: under gradient accumulation
                    # every micro-batch draws its own randomness
                    inputs, targets, index = batch_transform(
                        inputs, targets, index, inner.student, state.setdefault("batches", 0)
                    )
                state["batches"] = state.get("batches", 0) + 1
                with accelerator.accumulate(model):
                    outputs, student_features = model(inputs)
                    step = StepOutputs(outputs, None, targets, student_features, inputs=inputs)
                    if frozen is not None:
                        step.teacher, step.teacher_features = _teacher_step(
                            frozen, teacher_layers, inputs, index
                        )
                        if args.classic and args.alpha > 0:
                            _check_shapes(step.student, step.teacher, args.loss)
                    # the objective, as arithmetic: sum of weight * term; weight-0 terms only logged
                    values = _term_values(terms, step, has_teacher=frozen is not None)
                    loss = sum(t.weight * values[t.name] for t in terms if t.weight > 0)
                    _check_finite(loss, values, state["step"], epoch, ckpt_root)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                        state["step"] += 1
                    optimizer.zero_grad()
                # the critics' turn, on this batch with the student's side held fixed
                values.update(_critic_step(critic_terms, step, critic_optimizer, accelerator))
                n = _batch_size(inputs, targets)
                seen += n
                sums["loss"] += loss.item() * n
                for name, value in values.items():
                    sums[name] += value.item() * n
                progress.update(
                    task_id, advance=1, status=f"epoch {epoch + 1} loss {sums['loss'] / seen:.4f}"
                )

            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": state["step"],
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": round(time.perf_counter() - started, 4),
                **{f"train/{key}": value / max(seen, 1) for key, value in sums.items()},
            }
            if val_loader is not None:
                record.update(
                    {
                        f"val/{k}": v
                        for k, v in evaluate(
                            inner.student, val_loader, eval_task, accelerator
                        ).items()
                    }
                )
            value = record.get(f"val/{metric}")
            improved = val_loader is None or is_better(select_task, value, state["best_value"])
            if improved:
                state.update(best_value=value, best_epoch=epoch + 1, bad_epochs=0)
                if run_dir and accelerator.is_main_process:
                    atomic_save_tensors(inner.student.state_dict(), run_dir / BEST)
                else:
                    state["best_weights"] = _snapshot(inner.student)
            else:
                state["bad_epochs"] += 1
            stopped_early = args.patience is not None and state["bad_epochs"] >= args.patience
            log.log(record)
            state["history"] = log.records
            state["stopped_early"] = stopped_early
            if val_loader is not None:
                status = (
                    f"epoch {epoch + 1} val {metric} {value:.4f} (best {state['best_value']:.4f})"
                )
                progress.update(task_id, status=status)
            if ckpt_root and accelerator.is_main_process:
                saved = {k: v for k, v in state.items() if k != "best_weights"}
                if accelerator.scaler is not None:
                    saved["grad_scaler"] = accelerator.scaler.state_dict()
                # student and projectors: a resumed run continues both
                save_checkpoint(
                    ckpt_root,
                    epoch + 1,
                    inner.student,
                    optimizer,
                    scheduler,
                    saved,
                    inner.projectors,
                    critics=critics if critic_terms else None,
                    critic_optimizer=critic_optimizer,
                )

    trained = inner.student
    accelerator.wait_for_everyone()  # the main process wrote best.safetensors
    if run_dir and (run_dir / BEST).is_file():
        trained.load_state_dict(load_file(str(run_dir / BEST)))
    elif "best_weights" in state:
        trained.load_state_dict(state["best_weights"])
    return DistillResult(
        student=trained,
        history=log.records,
        metric=metric,
        best_epoch=state["best_epoch"],
        best_value=state["best_value"],
        stopped_early=stopped_early,
        run_dir=run_dir,
    )


def _term_values(terms: list, step: StepOutputs, has_teacher: bool) -> dict[str, torch.Tensor]:
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


def _critic_names(critic_terms: list[Term]) -> list[str]:
    return [f"{t.name}/{what}" for t in critic_terms for what in ("critic_loss", "critic_accuracy")]


def _critic_step(
    critic_terms: list[Term],
    step: StepOutputs,
    optimizer: torch.optim.Optimizer | None,
    accelerator: Accelerator,
) -> dict[str, torch.Tensor]:
    """One update of every critic on this batch, the student's outputs detached: the student has
    just moved, now the discriminator answers. Returns their losses and accuracies for the log."""
    if not critic_terms:
        return {}
    assert optimizer is not None
    detached = replace(
        step,
        student=_detach(step.student),
        student_features={k: v.detach() for k, v in step.student_features.items()},
    )
    # the student's adversarial term also left gradients on the critics: start from zero
    optimizer.zero_grad()
    logged: dict[str, torch.Tensor] = {}
    total = 0.0
    for term in critic_terms:
        assert term.critic_compute is not None
        loss, accuracy = term.critic_compute(detached)
        total = total + loss
        logged[f"{term.name}/critic_loss"] = loss.detach()
        logged[f"{term.name}/critic_accuracy"] = accuracy.detach()
    total.backward()
    if accelerator.num_processes > 1:  # the critics are not DDP-wrapped: average their gradients
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
    optimizer.step()
    optimizer.zero_grad()
    return logged


def _detach(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return {key: value.detach() for key, value in outputs.items()}
    return outputs.detach()


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


def _check_shapes(student_outputs: Any, teacher_outputs: Any, loss: str) -> None:
    if isinstance(student_outputs, dict) or isinstance(teacher_outputs, dict):
        return  # named outputs: each term checks the pair it reads
    if isinstance(teacher_outputs, TopKTargets):
        if loss != "topk_soft_target":
            raise StillroomError(
                f"the teacher gives top-k targets (a top-k store) but distill.loss is '{loss}'; "
                "use distill.loss=topk_soft_target"
            )
        positions = [size for dim, size in enumerate(student_outputs.shape) if dim != 1]
        if list(teacher_outputs.tail_mass.shape) != positions:
            raise StillroomError(
                f"student outputs {tuple(student_outputs.shape)} but the top-k targets cover "
                f"positions {tuple(teacher_outputs.tail_mass.shape)}: the store was made for other data"
            )
        return
    if loss == "topk_soft_target":
        raise StillroomError(
            "distill.loss=topk_soft_target needs a top-k store as the teacher (stillroom cache --top-k K)"
        )
    if student_outputs.shape != teacher_outputs.shape and not (
        loss == "regression" and student_outputs.numel() == teacher_outputs.numel()
    ):
        raise StillroomError(
            f"student outputs {tuple(student_outputs.shape)} but teacher outputs "
            f"{tuple(teacher_outputs.shape)}: give the student the teacher's number of outputs "
            "(classes) and output shape"
        )


def _check_finite(
    loss: torch.Tensor,
    values: dict[str, torch.Tensor],
    step: int,
    epoch: int,
    ckpt_root: Path | None,
) -> None:
    """Stop before a NaN/inf reaches the weights, naming the step and the term that went bad."""
    if torch.isfinite(loss):
        return
    bad = [name for name, value in values.items() if not torch.isfinite(value)]
    saved = ckpt_root is not None and (ckpt_root / "latest.json").is_file()
    where = f"the last good checkpoint is in {ckpt_root}" if saved else "no checkpoint was written"
    raise NonFiniteLossError(
        f"loss term '{bad[0] if bad else 'total'}' became {loss.item()} at step {step + 1} "
        f"(epoch {epoch + 1}); {where}. Lower lr, or check the inputs/teacher outputs for NaN"
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _build_critic_optimizer(critic_terms: list[Term]) -> torch.optim.Optimizer | None:
    """Adam with beta1 = 0.5, the usual choice for GAN discriminators (Radford et al. 2016)."""
    if not critic_terms:
        return None
    groups = [{"params": list(t.critic.parameters()), "lr": t.critic_lr} for t in critic_terms]
    return torch.optim.Adam(groups, betas=(0.5, 0.999))


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
