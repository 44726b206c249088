"""Flower apps for federated distillation (needs `pip install 'stillroom[federated]'`).

    client_app(fed)              a `ClientApp` whose train handler is `engine.client_update`
                                 on the shard of its node's partition id
    FedDF(fed, algorithm, ...)   a `Strategy` (Flower's FedAvg, whose aggregate_train then
                                 distils the average on the server: `engine.server_update`)
    server_app(fed, ...)         a `ServerApp` running the strategy for the remaining rounds
    run_flower(fed, ...)         both through Flower's simulation engine (one node per client)

The same apps run in a Flower deployment (`flwr run`), where each SuperNode's partition id picks
its shard; the server's transfer and validation data stay on the server. Clients here share one
architecture (Flower's FedAvg averages one ArrayRecord); heterogeneous clients run in the
in-process engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stillroom.errors import StillroomError
from stillroom.federated.core import accuracy, state_bytes
from stillroom.federated.engine import Federation, build_seeded, client_update, server_update
from stillroom.models import build_model, load_model, save_model
from stillroom.runs import is_complete, mark_complete


def check_flower() -> None:
    """One line when Flower is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise StillroomError(
            "federated.engine flower needs Flower: pip install 'stillroom[federated]' (or use "
            "federated.engine=local)"
        ) from None


def client_app(fed: Federation):
    """A Flower `ClientApp`: a train message with the global arrays -> the client's new arrays
    and its sample count (the only things that leave the client)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        return Message(content=train_update(fed, msg.content, k), reply_to=msg)

    return app


def train_update(fed: Federation, content: Any, k: int) -> Any:
    """Client k's reply content to a train message's content (the ClientApp's handler, callable
    without Flower's engine): its new arrays and its sample count."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    state = content["arrays"].to_torch_state_dict()
    round_ = int(content["config"]["server-round"])
    new, n = client_update(fed, k, state, round_)
    return RecordDict(
        {"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": n, "client": k})}
    )


def strategy_class():
    from flwr.serverapp.strategy import FedAvg

    class FedDF(FedAvg):
        """FedAvg, then (algorithm feddf) the server's ensemble distillation of the average from
        the client models' mean logits on its transfer set; every round saved as a phase."""

        def __init__(
            self, fed: Federation, algorithm: str, folder: Path, offset: int = 0, **kwargs: Any
        ) -> None:
            n = len(fed.shards)
            kwargs = {"min_train_nodes": n, "min_available_nodes": n, **kwargs}
            super().__init__(fraction_evaluate=0.0, **kwargs)
            self.fed, self.algorithm, self.folder, self.offset = fed, algorithm, folder, offset
            self.history: list[dict[str, Any]] = []

        def aggregate_train(self, server_round: int, replies: Iterable[Any]):
            from flwr.app import ArrayRecord, MetricRecord

            replies = list(replies)
            valid = [m for m in replies if not m.has_error()]
            if len(valid) < len(replies):
                raise StillroomError(
                    f"round {server_round}: {len(replies) - len(valid)} client(s) failed; "
                    "resume the run to retry the round"
                )
            updates = [
                (
                    int(m.content["metrics"]["client"]),
                    m.content["arrays"].to_torch_state_dict(),
                    int(m.content["metrics"]["num-examples"]),
                )
                for m in valid
            ]
            round_ = server_round + self.offset
            (state,) = server_update(self.fed, self.algorithm, updates, round_)
            self.history.append(save_round(self.fed, state, self.folder, round_))
            return ArrayRecord(state), MetricRecord({"accuracy": self.history[-1]["accuracy"][0]})

    return FedDF


def save_round(fed: Federation, state: Any, folder: Path, round_: int) -> dict[str, Any]:
    """Round `round_`'s global model into folder/round_NNN/group_0, marked complete."""
    model = build_model(fed.specs[0], fed.input_shape, fed.num_outputs)
    model.load_state_dict(state)
    phase = folder / f"round_{round_:03d}"
    save_model(
        model,
        fed.specs[0],
        phase / "group_0",
        input_shape=list(fed.input_shape),
        num_outputs=fed.num_outputs,
    )
    size = state_bytes(state)
    record = {
        "round": round_,
        "accuracy": [accuracy(model, *fed.test)],
        "bytes_up": [size] * len(fed.shards),
        "bytes_down": [size] * len(fed.shards),
    }
    mark_complete(phase, record)
    return record


def server_app(fed: Federation, algorithm: str, folder: Path, history: list, resume: bool):
    """A Flower `ServerApp` that runs the rounds not yet complete in `folder`, appending every
    round's record to `history`."""
    import json

    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        done = 0
        while resume and done < fed.rounds and is_complete(folder / f"round_{done + 1:03d}"):
            done += 1
        for r in range(1, done + 1):
            history.append(json.loads((folder / f"round_{r:03d}" / "done.json").read_text()))
        if done:
            initial = load_model(folder / f"round_{done:03d}" / "group_0")[0]
        else:
            initial = build_seeded(fed, 0, fed.seed)
        if done == fed.rounds:
            return
        strategy = strategy_class()(fed, algorithm, folder, offset=done)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial.state_dict()),
            num_rounds=fed.rounds - done,
            train_config=ConfigRecord({}),
        )
        history.extend(strategy.history)

    return app


def run_flower(fed: Federation, algorithm: str, folder: Path, resume: bool) -> list[dict[str, Any]]:
    """Every round through Flower's simulation engine, one SuperNode per client."""
    check_flower()
    from flwr.simulation import run_simulation

    if len(fed.specs) != 1:
        raise StillroomError("federated.engine flower runs clients of one architecture")
    history: list[dict[str, Any]] = []
    run_simulation(
        server_app=server_app(fed, algorithm, folder, history, resume),
        client_app=client_app(fed),
        num_supernodes=len(fed.shards),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if len(history) != fed.rounds:
        raise StillroomError(
            f"Flower's simulation ended after {len(history)} of {fed.rounds} rounds of "
            f"{algorithm}; see its log above, then resume the run"
        )
    return history
