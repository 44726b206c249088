"""User-item interactions for ranking: read a file, encode ids, split leave-last-out, sample
negatives.

    read_interactions   a CSV / TSV / Parquet / JSON (lines) file, or a MovieLens/RecBole
                        `.inter` file (tab-separated, headers `name:type`), read with pyarrow;
                        columns user, item and optional rating and timestamp, named by the recipe
    prepare_interactions
                        implicit feedback (rating >= threshold, or every interaction), ids encoded
                        to 0..n-1 (the encoding is saved in the run folder as ids.json), users with
                        too few positives dropped (counted), each user's last positive by time the
                        test item, the one before it the validation item, the rest training
    eval_candidates     one held-out positive + N sampled negatives per user (items the user never
                        interacted with), seeded
    sample_negatives    training negatives, uniform over the catalogue, resampled when observed

Every problem with the file is one StillroomError line, raised before a run folder is written.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.errors import StillroomError

SUFFIXES = (".csv", ".tsv", ".parquet", ".json", ".jsonl", ".inter")


@dataclass(frozen=True)
class Columns:
    user: str = "user"
    item: str = "item"
    rating: str | None = None
    timestamp: str | None = None


def read_interactions(path: Path, columns: Columns) -> dict[str, np.ndarray]:
    """{"user", "item"[, "rating", "timestamp"]: arrays} of the file's rows, in file order. Ids
    come back as given (int64 or str arrays); rating and timestamp as float64."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path)
    if not path.is_file():
        raise StillroomError(f"interactions file {path} does not exist; check data.path")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StillroomError(
            f"interactions file {path}: unknown format {suffix or '(no suffix)'}; use one of "
            f"{', '.join(SUFFIXES)}"
        )
    try:
        table = _read_table(path, suffix)
    except (pa.ArrowException, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StillroomError(f"interactions file {path} cannot be read: {first}") from None
    if suffix == ".inter":  # RecBole headers carry their type: "user_id:token"
        table = table.rename_columns([name.split(":")[0] for name in table.column_names])
    wanted = {"user": columns.user, "item": columns.item}
    wanted |= {k: v for k, v in (("rating", columns.rating), ("timestamp", columns.timestamp)) if v}
    missing = [
        f"{role} column {name!r}" for role, name in wanted.items() if name not in table.column_names
    ]
    if missing:
        raise StillroomError(
            f"interactions file {path} has no {', '.join(missing)}; it has "
            f"{', '.join(table.column_names) or 'no columns'} (set data.user_column, item_column, "
            "rating_column, timestamp_column)"
        )
    out: dict[str, np.ndarray] = {}
    for role, name in wanted.items():
        column = table.column(name)
        if column.null_count:
            raise StillroomError(
                f"interactions file {path}: column {name!r} has {column.null_count} empty values"
            )
        kind = column.type
        if role in ("user", "item"):
            if pa.types.is_integer(kind):
                out[role] = column.to_numpy().astype(np.int64)
            elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
                out[role] = np.asarray(column.to_pylist(), dtype=object)
            else:
                raise StillroomError(
                    f"interactions file {path}: {role} ids in column {name!r} are {kind}; ids must "
                    "be integers or strings"
                )
        else:
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise StillroomError(
                    f"interactions file {path}: {role} column {name!r} is {kind}, not a number"
                )
            out[role] = pc.cast(column, pa.float64()).to_numpy()
    if len(out["user"]) == 0:
        raise StillroomError(f"interactions file {path} holds no rows")
    return out


def _read_table(path: Path, suffix: str) -> Any:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if suffix == ".parquet":
        return pq.read_table(path)
    if suffix in (".json", ".jsonl"):
        return pjson.read_json(path)
    delimiter = "\t" if suffix in (".tsv", ".inter") else ","
    return pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delimiter))


@dataclass
class Interactions:
    """Implicit feedback, encoded and split. Indices are 0..n_users-1 and 0..n_items-1."""

    n_users: int
    n_items: int
    user_ids: list[Any]
    """The file's id of each user index (ids.json)."""
    item_ids: list[Any]
    train_users: np.ndarray  # (P,) int64: the training positives
    train_items: np.ndarray
    val_items: np.ndarray  # (n_users,) one held-out positive per user
    test_items: np.ndarray
    seen: list[np.ndarray]
    """Per user: every item they interacted with in the file (never sampled as a negative)."""
    dropped_users: int
    positives: int

    def train_pairs(self) -> set[tuple[int, int]]:
        return set(zip(self.train_users.tolist(), self.train_items.tolist(), strict=True))

    def save_ids(self, path: Path) -> None:
        from stillroom.io import atomic_write_text

        atomic_write_text(
            Path(path), json.dumps({"users": self.user_ids, "items": self.item_ids}, default=str)
        )


def prepare_interactions(
    raw: dict[str, np.ndarray],
    threshold: float | None,
    min_positives: int,
    source: str,
    drop_sparse_users: bool = True,
) -> Interactions:
    """Implicit feedback and the leave-last-out split (see the module docstring). Rows are ordered
    by timestamp (file order without one, and among ties)."""
    users_raw, items_raw = raw["user"], raw["item"]
    user_ids, users = np.unique(users_raw, return_inverse=True)
    item_ids, items = np.unique(items_raw, return_inverse=True)
    n_users_file, n_items = len(user_ids), len(item_ids)
    positive = np.ones(len(users), dtype=bool)
    if threshold is not None:
        if "rating" not in raw:
            raise StillroomError(
                f"{source}: data.positive_threshold {threshold} needs a rating column "
                "(data.rating_column); or set positive_threshold: null (every interaction counts)"
            )
        positive = raw["rating"] >= threshold
    order = np.arange(len(users))
    if "timestamp" in raw:
        order = np.argsort(raw["timestamp"], kind="stable")
    seen = _seen(users, items, n_users_file)
    pos_order = order[positive[order]]
    pu, pi = users[pos_order], items[pos_order]
    counts = np.bincount(pu, minlength=n_users_file)
    keep = counts >= min_positives
    if not drop_sparse_users and not keep.all():
        first = _plain(user_ids[np.flatnonzero(~keep)[0]])
        raise StillroomError(
            f"{source}: user {first!r} (and {int((~keep).sum()) - 1} more) has fewer than "
            f"{min_positives} positive interactions, so the split leaves it no training item; "
            "set data.drop_sparse_users: true to drop such users"
        )
    if not keep.any():
        raise StillroomError(
            f"{source}: no user has {min_positives} or more positive interactions "
            f"(rating >= {threshold})"
            if threshold is not None
            else f"{source}: no user has {min_positives} or more interactions"
        )
    # users kept are re-indexed 0..n-1; items keep the file's catalogue (items nobody kept
    # interacts with remain candidates)
    new_index = np.cumsum(keep) - 1
    mask = keep[pu]
    pu, pi = new_index[pu[mask]], pi[mask]
    n_users = int(keep.sum())
    # the last two positives of each user (in time order) are its test and validation items
    rank_from_end = _rank_from_end(pu, n_users)
    test_items = np.empty(n_users, dtype=np.int64)
    val_items = np.empty(n_users, dtype=np.int64)
    test_items[pu[rank_from_end == 0]] = pi[rank_from_end == 0]
    val_items[pu[rank_from_end == 1]] = pi[rank_from_end == 1]
    train = rank_from_end >= 2
    kept_seen = [seen[u] for u in np.flatnonzero(keep)]
    return Interactions(
        n_users=n_users,
        n_items=n_items,
        user_ids=[_plain(v) for v in user_ids[keep]],
        item_ids=[_plain(v) for v in item_ids],
        train_users=pu[train].astype(np.int64),
        train_items=pi[train].astype(np.int64),
        val_items=val_items,
        test_items=test_items,
        seen=kept_seen,
        dropped_users=int((~keep).sum()),
        positives=int(mask.sum()),
    )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _seen(users: np.ndarray, items: np.ndarray, n_users: int) -> list[np.ndarray]:
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(n_users + 1))
    return [np.unique(items[order[a:b]]) for a, b in itertools.pairwise(bounds)]


def _rank_from_end(users: np.ndarray, n_users: int) -> np.ndarray:
    """For rows in time order: 0 for each user's last row, 1 for the one before, ..."""
    counts = np.bincount(users, minlength=n_users)
    order = np.argsort(users, kind="stable")  # time order kept within each user
    position = np.empty(len(users), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position[order] = np.arange(len(users)) - np.repeat(starts, counts)
    return counts[users] - 1 - position


def check_negatives(data: Interactions, num_negatives: int, source: str) -> None:
    """One line when some user has fewer never-seen items than `num_negatives`."""
    unseen = data.n_items - max(len(s) for s in data.seen)
    if num_negatives > unseen:
        raise StillroomError(
            f"{source}: {num_negatives} sampled negatives per user, but the catalogue has "
            f"{data.n_items} items and a user has interacted with {data.n_items - unseen}, leaving "
            f"{unseen}; lower the negative count"
        )


def eval_candidates(
    data: Interactions, held_out: np.ndarray, num_negatives: int, seed: int
) -> np.ndarray:
    """(n_users, 1 + 1 + N) int64: user index, the held-out positive, then N negatives drawn
    without replacement from the items the user never interacted with (seeded)."""
    rng = np.random.default_rng(seed)
    rows = np.empty((data.n_users, 2 + num_negatives), dtype=np.int64)
    all_items = np.arange(data.n_items)
    for u in range(data.n_users):
        # rejection sampling is fast while the user has seen a small part of the catalogue
        draws = rng.choice(
            data.n_items, size=min(data.n_items, 2 * num_negatives + 8), replace=False
        )
        fresh = draws[~np.isin(draws, data.seen[u])]
        if len(fresh) >= num_negatives:
            negatives = fresh[:num_negatives]
        else:
            pool = np.setdiff1d(all_items, data.seen[u], assume_unique=True)
            negatives = rng.choice(pool, size=num_negatives, replace=False)
        rows[u] = np.concatenate([[u, held_out[u]], negatives])
    return rows


def seen_keys(data: Interactions) -> np.ndarray:
    """Sorted user * n_items + item keys of every observed pair (for negative rejection)."""
    keys = [u * data.n_items + s for u, s in enumerate(data.seen)]
    return np.sort(np.concatenate(keys))


def sample_negatives(
    users: np.ndarray, count: int, n_items: int, keys: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(len(users), count) items drawn uniformly, redrawn (a few rounds) where the user interacted
    with them: training negatives as in NCF."""
    items = rng.integers(0, n_items, size=(len(users), count))
    for _ in range(5):
        pair = users[:, None] * n_items + items
        at = np.minimum(np.searchsorted(keys, pair), len(keys) - 1)
        hit = keys[at] == pair
        if not hit.any():
            break
        items[hit] = rng.integers(0, n_items, size=int(hit.sum()))
    return items


def make_interactions(
    path: Path, n_users: int = 60, n_items: int = 80, per_user: int = 12, seed: int = 0
) -> Path:
    """Write a CSV of generated interactions (user, item, rating, timestamp): users and items with
    low-rank tastes, each user rating `per_user` items, the liked ones rated 4-5; for tests and
    examples (no download)."""
    rng = np.random.default_rng(seed)
    taste_u = rng.normal(size=(n_users, 3))
    taste_i = rng.normal(size=(n_items, 3))
    popularity = rng.normal(size=n_items)
    lines = ["user,item,rating,timestamp"]
    t = 1_000_000
    for u in range(n_users):
        logits = taste_u[u] @ taste_i.T + popularity
        p = np.exp(logits - logits.max())
        chosen = rng.choice(n_items, size=per_user, replace=False, p=p / p.sum())
        for i in chosen:
            rating = 5 if logits[i] > 1.0 else 4 if logits[i] > 0 else int(rng.integers(1, 4))
            t += int(rng.integers(1, 100))
            lines.append(f"u{u},i{i},{rating},{t}")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


__all__ = [
    "Columns",
    "Interactions",
    "check_negatives",
    "eval_candidates",
    "make_interactions",
    "prepare_interactions",
    "read_interactions",
    "sample_negatives",
    "seen_keys",
]
