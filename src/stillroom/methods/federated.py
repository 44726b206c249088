"""`method: federated`: distillation across clients that never pool their raw data.

    training split -> a server-only unlabelled transfer set (transfer_fraction)
                   -> the rest dealt to `clients` by a Dirichlet(alpha) split over classes
    each round: every client trains its copy locally and sends only its weights;
        fedavg: the server averages them (within each architecture);
        feddf:  the server averages, then distils every architecture's average from the mean
                logits of all client models on the transfer set (Lin et al. 2020,
                arXiv:2006.07242), which is how clients of different architectures (FedDF's
                point; FedAvg cannot average them) still learn from each other.
    beside them: each client trained on its own shard alone (local-only, the lower bound) and one
    model trained on the clients' data pooled (centralised, the upper bound).

Run folder (`stillroom distill recipes/digits_federated.yaml`):
    config.yaml
    split.json                 every client's sample count and class histogram
    fedavg/round_NNN/, feddf/round_NNN/
                               group_G/ (model.json + model.safetensors per architecture group),
                               done.json (last: test accuracy, bytes up/down per client)
    local/client_K/, central/  the comparison models, each with done.json
    rounds.json, accuracy_per_round.png
    summary.json, results.md   roles: distilled (feddf), baseline (fedavg, centralised), client

The same client and server functions run in Flower's engine or a Flower deployment
(stillroom.federated.flower: a ClientApp and the FedDF Strategy; federated.engine: flower).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console

from stillroom.config import DataSection, ModelSection, RecipeBase, check_student_trains
from stillroom.data import prepare_splits
from stillroom.errors import StillroomError
from stillroom.federated.core import dirichlet_split
from stillroom.federated.engine import ALGORITHMS, Federation, run_rounds, train_alone
from stillroom.io import atomic_write_json
from stillroom.losses import IGNORE_INDEX
from stillroom.measure import model_costs
from stillroom.models import load_model
from stillroom.results import ModelResult, Summary, describe, write_summary
from stillroom.runs import prepare_run_dir

__all__ = ["FederatedRecipe", "FederatedSection", "run_federated"]


class FederatedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clients: int = Field(10, ge=1, le=10_000, description="how many clients share the data")
    alpha: float = Field(
        0.1,
        allow_inf_nan=False,
        description="Dirichlet concentration of the class split: 0.1 very non-IID, 1.0 mild, "
        "large values close to IID (must be > 0)",
    )
    rounds: int = Field(10, ge=1, le=10_000)
    local_epochs: int = Field(2, ge=1, le=10_000, description="each client's epochs per round")
    lr: float = Field(3e-3, gt=0, le=10, description="clients' Adam learning rate")
    batch_size: int = Field(32, ge=1)
    transfer_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of the training split kept by the server as unlabelled transfer data "
        "(no client sees it; FedDF distils on it)",
    )
    server_steps: int = Field(200, ge=1, le=1_000_000, description="FedDF distillation steps")
    server_lr: float = Field(1e-3, gt=0, le=10)
    temperature: float = Field(1.0, gt=0, le=1000, allow_inf_nan=False)
    algorithms: list[Literal[ALGORITHMS]] = Field(  # type: ignore[valid-type]
        list(ALGORITHMS), min_length=1, description="what to run on the same split and seeds"
    )
    local_only: bool = Field(True, description="also train every client on its own shard alone")
    centralised: bool = Field(True, description="also train one model on the pooled client data")
    engine: Literal["local", "flower"] = Field(
        "local",
        description="local: the rounds in this process; flower: through Flower's simulation "
        "engine (pip install 'stillroom[federated]')",
    )

    @model_validator(mode="after")
    def _alpha_positive(self) -> FederatedSection:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {self.alpha}")
        return self


class FederatedRecipe(RecipeBase):
    """Federated distillation (method: federated): FedAvg vs FedDF on a non-IID client split."""

    method: Literal["federated"] = "federated"
    name: str = "digits_federated"
    data: DataSection = DataSection()
    federated: FederatedSection = FederatedSection()
    client_models: list[ModelSection] = Field(
        [ModelSection()],
        min_length=1,
        max_length=16,
        description="client k trains client_models[k % len]: several entries make the clients "
        "heterogeneous (FedAvg then averages within each architecture only)",
    )
    absent: ClassVar[dict[str, str]] = {
        "teacher": "a federated recipe has no teacher: the clients' models are the ensemble the "
        "server distils; set client_models and federated",
        "student": "a federated recipe names its models under client_models",
    }

    @model_validator(mode="after")
    def _models_train(self) -> FederatedRecipe:
        for section in self.client_models:
            check_student_trains(section)
        if self.federated.engine == "flower" and len(self.groups()[0]) > 1:
            raise ValueError(
                "federated.engine flower runs clients of one architecture; give one "
                "client_models entry, or use engine local"
            )
        return self

    def groups(self) -> tuple[list[dict[str, Any]], list[int]]:
        """(one spec per distinct architecture, each client's group)."""
        specs: list[dict[str, Any]] = []
        groups = []
        for k in range(self.federated.clients):
            spec = self.client_models[k % len(self.client_models)].spec()
            if spec not in specs:
                specs.append(spec)
            groups.append(specs.index(spec))
        return specs, groups


def build_federation(recipe: FederatedRecipe) -> tuple[Federation, dict[str, Any]]:
    """The split and every setting, checked: (the federation, split.json's record)."""
    splits = prepare_splits(recipe.data, recipe.seed)
    train = splits.train
    if train.task != "classification":
        raise StillroomError(
            f"method federated splits classes across clients, but '{recipe.data.source}' is "
            f"{train.task} data; use classification data"
        )
    if train.mapped:
        raise StillroomError(
            "method federated needs the data in memory; raise data.memory_limit_mb"
        )
    fed = recipe.federated
    keep = train.targets != IGNORE_INDEX
    inputs, targets = train.inputs[keep], train.targets[keep]
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(recipe.seed))
    n_transfer = round(fed.transfer_fraction * len(order))
    transfer, pooled = order[:n_transfer], order[n_transfer:]
    parts = dirichlet_split(targets[pooled], fed.clients, fed.alpha, recipe.seed, train.num_outputs)
    shards = [(inputs[pooled[p]], targets[pooled[p]]) for p in parts]
    specs, client_group = recipe.groups()
    federation = Federation(
        specs=specs,
        client_group=client_group,
        shards=shards,
        transfer=inputs[transfer],
        val=(splits.val.inputs, splits.val.targets),
        test=(splits.test.inputs, splits.test.targets),
        input_shape=train.input_shape,
        num_outputs=train.num_outputs,
        rounds=fed.rounds,
        local_epochs=fed.local_epochs,
        lr=fed.lr,
        batch_size=fed.batch_size,
        server_steps=fed.server_steps,
        server_lr=fed.server_lr,
        temperature=fed.temperature,
        seed=recipe.seed,
    )
    record = {
        "transfer_samples": n_transfer,
        "clients": [
            {
                "samples": len(y),
                "group": client_group[k],
                "classes": torch.bincount(y, minlength=train.num_outputs).tolist(),
            }
            for k, (_, y) in enumerate(shards)
        ],
    }
    return federation, record


def run_federated(
    recipe: FederatedRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Summary:
    """Every algorithm's rounds, and the comparison models, into `run_dir`; --resume continues at
    the first round (or comparison model) without its done.json."""
    run_dir = Path(run_dir)
    federation, record = build_federation(recipe)  # every check before the folder is written
    if recipe.federated.engine == "flower":
        from stillroom.federated.flower import check_flower

        check_flower()
    prepare_run_dir(run_dir, recipe, resume, force, (recipe.data.path,))
    atomic_write_json(run_dir / "split.json", record)
    console = Console(stderr=True, highlight=False)
    say = console.print if progress else None

    histories = {}
    for algorithm in recipe.federated.algorithms:
        if recipe.federated.engine == "flower":
            from stillroom.federated.flower import run_flower

            histories[algorithm] = run_flower(federation, algorithm, run_dir / algorithm, resume)
        else:
            histories[algorithm] = run_rounds(
                federation, algorithm, run_dir / algorithm, resume, say
            )
    local = []
    if recipe.federated.local_only:
        for k, (x, y) in enumerate(federation.shards):
            group = federation.client_group[k]
            folder = run_dir / "local" / f"client_{k}"
            local.append(train_alone(federation, x, y, group, folder, resume, recipe.seed + k))
    central = None
    if recipe.federated.centralised:
        x = torch.cat([s[0] for s in federation.shards])
        y = torch.cat([s[1] for s in federation.shards])
        central = train_alone(federation, x, y, 0, run_dir / "central", resume, recipe.seed)

    atomic_write_json(
        run_dir / "rounds.json",
        {"histories": histories, "local_only": local, "centralised": central},
    )
    _plot(run_dir, federation, histories, local, central)
    summary = _summary(recipe, run_dir, federation, histories, local, central)
    write_summary(summary, run_dir)
    return summary


def _arch(spec: dict[str, Any]) -> str:
    return describe(spec)


def _row(
    run_dir: Path, name: str, role: str, folder: Path, metrics: dict[str, Any], input_shape
) -> ModelResult:
    model, meta = load_model(folder)
    costs = model_costs(model, folder / "model.safetensors", input_shape)
    return ModelResult(
        name=name,
        role=role,  # type: ignore[arg-type]
        metrics=metrics,
        folder=str(folder.relative_to(run_dir)),
        parameters=int(costs["parameters"]),
        size_bytes=int(costs["size_bytes"]),
        latency_ms=costs["latency_ms"],
        architecture=_arch(meta["spec"]),
    )


def _summary(
    recipe: FederatedRecipe,
    run_dir: Path,
    fed: Federation,
    histories: dict[str, list[dict[str, Any]]],
    local: list[float],
    central: float | None,
) -> Summary:
    rows = []
    several = len(fed.specs) > 1
    last = f"round_{fed.rounds:03d}"
    for algorithm, history in histories.items():
        role = "distilled" if algorithm == "feddf" else "baseline"
        for g, spec in enumerate(fed.specs):
            name = f"{algorithm}/{_arch(spec)}" if several else algorithm
            curve = [h["accuracy"][g] for h in history]
            metrics = {"accuracy": curve[-1], "best_round_accuracy": max(curve)}
            first = fed.client_group.index(g)  # every client of a group sends the same size
            metrics["bytes_per_round_per_client"] = float(history[-1]["bytes_up"][first])
            folder = run_dir / algorithm / last / f"group_{g}"
            rows.append(_row(run_dir, name, role, folder, metrics, fed.input_shape))
    if central is not None:
        rows.append(
            _row(
                run_dir,
                "centralised",
                "baseline",
                run_dir / "central",
                {"accuracy": central},
                fed.input_shape,
            )
        )
    for k, score in enumerate(local):
        folder = run_dir / "local" / f"client_{k}"
        rows.append(
            _row(run_dir, f"local_{k}", "client", folder, {"accuracy": score}, fed.input_shape)
        )
    notes = []
    if local:
        notes.append(f"local-only: mean client test accuracy {sum(local) / len(local):.4f}")
    if "feddf" in histories and "fedavg" in histories:
        for g, spec in enumerate(fed.specs):
            gain = histories["feddf"][-1]["accuracy"][g] - histories["fedavg"][-1]["accuracy"][g]
            notes.append(f"feddf - fedavg ({_arch(spec)}): {gain * 100:+.1f} points")
    if several:
        notes.append(
            "clients of several architectures: fedavg averages each architecture's clients only; "
            "feddf distils every architecture from all clients' mean logits"
        )
    primary = next((r.name for r in rows if r.role == "distilled"), rows[0].name)
    return Summary(
        method="federated",
        title=f"federated distillation: {recipe.federated.clients} clients, Dirichlet alpha "
        f"{recipe.federated.alpha}, {recipe.federated.rounds} rounds",
        task="classification",
        metric="accuracy",
        higher_is_better=True,
        models=rows,
        settings={
            "data": recipe.data.source,
            "clients": recipe.federated.clients,
            "alpha": recipe.federated.alpha,
            "rounds": recipe.federated.rounds,
            "local_epochs": recipe.federated.local_epochs,
            "transfer_samples": len(fed.transfer),
            "server_steps": recipe.federated.server_steps,
            "engine": recipe.federated.engine,
            "seed": recipe.seed,
        },
        notes=notes,
        primary=primary,
    )


def _plot(run_dir, fed, histories, local, central) -> None:
    from stillroom.plots import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algorithm, history in histories.items():
        for g, spec in enumerate(fed.specs):
            label = f"{algorithm} ({_arch(spec)})" if len(fed.specs) > 1 else algorithm
            ax.plot(
                [h["round"] for h in history],
                [h["accuracy"][g] for h in history],
                marker="o",
                label=label,
            )
    if central is not None:
        ax.axhline(central, color="tab:gray", linestyle="--", label="centralised")
    if local:
        ax.axhline(sum(local) / len(local), color="tab:red", linestyle=":", label="local-only mean")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_per_round.png", dpi=100)
    plt.close(fig)


def read_rounds(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "rounds.json").read_text())
