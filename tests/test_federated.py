"""Federated distillation: the Dirichlet split, FedAvg, FedDF's server step, the run folder
(report, resume by round), bad input; the Flower apps called directly, and (slow) 2 rounds with
3 clients through Flower's own simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, stillroom_in_process
from stillroom.errors import StillroomError
from stillroom.federated.core import (
    dirichlet_split,
    distill_server,
    ensemble_logits,
    fedavg,
    get_state,
)
from stillroom.federated.engine import client_update, run_rounds, server_update
from stillroom.methods import load_method_recipe
from stillroom.methods.federated import FederatedRecipe, build_federation, run_federated
from stillroom.results import read_summary

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "digits_federated.yaml"
TINY = [
    "federated.clients=3",
    "federated.rounds=2",
    "federated.local_epochs=1",
    "federated.server_steps=5",
    "federated.alpha=1.0",
]


def test_dirichlet_split_covers_every_sample_once_and_is_seeded() -> None:
    targets = torch.arange(10).repeat(30)
    parts = dirichlet_split(targets, 10, 0.1, seed=3, num_classes=10)
    assert sorted(torch.cat(parts).tolist()) == list(range(300))
    assert all(len(p) > 0 for p in parts)
    again = dirichlet_split(targets, 10, 0.1, seed=3, num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))

    # small alpha: each client is dominated by few classes; large alpha: near uniform
    def top_share(alpha: float) -> float:
        shares = [
            torch.bincount(targets[p], minlength=10).max().item() / len(p)
            for p in dirichlet_split(targets, 10, alpha, seed=0, num_classes=10)
        ]
        return sum(shares) / len(shares)

    assert top_share(0.1) > 0.5 > 0.3 > top_share(100.0)


@pytest.mark.parametrize(
    ("clients", "alpha", "fragment"),
    [(400, 1.0, "more than the 300 training samples"), (3, 0.0, "must be > 0")],
)
def test_dirichlet_split_refuses(clients: int, alpha: float, fragment: str) -> None:
    with pytest.raises(StillroomError, match=fragment):
        dirichlet_split(torch.arange(10).repeat(30), clients, alpha, 0, 10)


def test_empty_client_is_one_line() -> None:
    with pytest.raises(StillroomError, match="a client has no data"):
        dirichlet_split(torch.zeros(12, dtype=torch.long), 12, 0.01, 0, 10)


def test_fedavg_is_the_weighted_mean() -> None:
    a = {"w": torch.zeros(2), "n": torch.tensor(5)}
    b = {"w": torch.ones(2) * 4, "n": torch.tensor(7)}
    mean = fedavg([a, b], [3, 1])
    assert torch.allclose(mean["w"], torch.ones(2)) and mean["n"].item() == 5


def test_server_distillation_moves_toward_the_ensemble_and_never_loses_val_accuracy() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 3)
    x = torch.randn(256, 4)
    y = teacher(x).argmax(1).detach()
    logits = ensemble_logits([teacher, teacher], x)
    from stillroom.federated.core import accuracy

    before = accuracy(student, x, y)
    distill_server(
        student, logits, x, x, y, steps=100, lr=0.05, temperature=1.0, batch_size=64, seed=0
    )
    assert accuracy(student, x, y) >= max(before, 0.9)


def test_client_and_server_updates_on_tiny_data() -> None:
    recipe = FederatedRecipe(
        federated={"clients": 3, "alpha": 1.0, "local_epochs": 1, "server_steps": 10}
    )
    fed, record = build_federation(recipe)
    assert sum(c["samples"] for c in record["clients"]) + record["transfer_samples"] > 1000
    from stillroom.federated.engine import build_seeded

    start = get_state(build_seeded(fed, 0, 0))
    updates = [(k, *client_update(fed, k, start, 1)) for k in range(3)]
    assert any(not torch.equal(updates[0][1][key], start[key]) for key in start)
    avg = server_update(fed, "fedavg", updates, 1)
    df = server_update(fed, "feddf", updates, 1)
    assert len(avg) == len(df) == 1
    assert any(not torch.equal(avg[0][k], df[0][k]) for k in avg[0])


def test_heterogeneous_clients_distil_across_architectures(tmp_path: Path) -> None:
    recipe = FederatedRecipe(
        federated={"clients": 4, "alpha": 1.0, "rounds": 1, "local_epochs": 1, "server_steps": 5},
        client_models=[{"kind": "mlp", "hidden": [32]}, {"kind": "mlp", "hidden": [16, 16]}],
    )
    fed, _ = build_federation(recipe)
    assert fed.client_group == [0, 1, 0, 1] and len(fed.specs) == 2
    history = run_rounds(fed, "feddf", tmp_path / "feddf", resume=False)
    assert len(history[0]["accuracy"]) == 2
    assert (tmp_path / "feddf" / "round_001" / "group_1" / "model.json").is_file()


def test_cli_run_report_and_resume_by_round(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["distill", RECIPE, *TINY, "--out", run_dir, "--no-progress"]
    result = stillroom_in_process(*args)
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    roles = {m.name: m.role for m in summary.models}
    assert roles["feddf"] == "distilled" and roles["fedavg"] == "baseline"
    assert roles["centralised"] == "baseline" and roles["local_0"] == "client"
    assert summary.primary == "feddf"
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert len(rounds["histories"]["feddf"]) == 2
    assert (run_dir / "accuracy_per_round.png").is_file()
    # resume after the last round was lost: only round 2 is trained again, to the same numbers
    done = run_dir / "feddf" / "round_002" / "done.json"
    before = json.loads(done.read_text())
    done.unlink()
    result = stillroom_in_process(*args[:-1], "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads(done.read_text())["accuracy"] == pytest.approx(before["accuracy"])
    report = stillroom_in_process("report", run_dir, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("federated.alpha=0", "alpha must be > 0"),
        ("federated.clients=5000", "more than the"),
        ("teacher.kind=cnn", "no teacher"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, override: str, fragment: str
) -> None:
    run_dir = tmp_path / "run"
    result = stillroom_in_process("distill", RECIPE, *TINY, override, "--out", run_dir)
    assert_user_error(result, fragment)
    assert not run_dir.exists()


def test_recipe_loads() -> None:
    _, recipe = load_method_recipe(RECIPE)
    assert recipe.federated.clients == 10 and recipe.federated.alpha == 0.1


# --- Flower ---------------------------------------------------------------------------------------


def _tiny_federation():
    recipe = FederatedRecipe(
        federated={"clients": 3, "alpha": 1.0, "rounds": 2, "local_epochs": 1, "server_steps": 5}
    )
    return build_federation(recipe)[0]


def test_flower_client_and_strategy_called_directly(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from stillroom.federated.engine import build_seeded
    from stillroom.federated.flower import strategy_class, train_update

    class Reply:  # what aggregate_train reads of a Flower Message (built only inside a run)
        def __init__(self, content: RecordDict) -> None:
            self.content = content

        def has_error(self) -> bool:
            return False

    fed = _tiny_federation()
    start = build_seeded(fed, 0, 0).state_dict()
    content = RecordDict(
        {"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}
    )
    replies = []
    for k in range(3):
        replies.append(Reply(train_update(fed, content, k)))
    assert int(replies[0].content["metrics"]["num-examples"]) == len(fed.shards[0][0])
    strategy = strategy_class()(fed, "feddf", tmp_path / "feddf")
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert set(arrays.to_torch_state_dict()) == set(start)
    assert 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "feddf" / "round_001" / "done.json").is_file()


@pytest.mark.slow
def test_flower_simulation_two_rounds_three_clients(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    recipe = FederatedRecipe(
        federated={
            "clients": 3,
            "alpha": 1.0,
            "rounds": 2,
            "local_epochs": 1,
            "server_steps": 5,
            "engine": "flower",
            "local_only": False,
        }
    )
    summary = run_federated(recipe, tmp_path / "run", progress=False)
    assert {m.name for m in summary.models} == {"fedavg", "feddf", "centralised"}
    assert (tmp_path / "run" / "feddf" / "round_002" / "done.json").is_file()
