"""YAML from files a user may have received: bounded in depth and in what aliases expand to,
so a kilobyte of nested aliases cannot become gigabytes, and error lines quote values shortened.
Used for recipes (stillroom.config) and for a run folder's config.yaml."""

from __future__ import annotations

from typing import Any

import yaml

from stillroom.errors import StillroomError

MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
"""A recipe expands to at most this many YAML nodes (aliases counted as what they expand to): a
kilobyte of nested aliases could otherwise expand to gigabytes."""
MAX_YAML_DEPTH = 64
MAX_SHOWN = 120
"""Characters of a given value quoted in an error message."""


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to `limit` characters, saying how long it was: no error line grows unbounded."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _check_yaml_size(text: str, source: str) -> None:
    """Refuse YAML that nests deeper than MAX_YAML_DEPTH or expands (aliases included) beyond
    MAX_YAML_NODES, from the event stream, before anything is built from it."""
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    frames: list[list[Any]] = [[None, 0]]  # [anchor, nodes so far] per open collection
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            frames[-1][1] += sizes.get(event.anchor or "", 1)
        elif isinstance(event, yaml.ScalarEvent):
            frames[-1][1] += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(frames) > MAX_YAML_DEPTH:
                raise StillroomError(
                    f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels; a recipe is a "
                    "few sections deep"
                )
            frames.append([event.anchor, 1])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, count = frames.pop()
            if anchor:
                sizes[anchor] = count
            frames[-1][1] += count
        if frames[-1][1] > MAX_YAML_NODES:
            raise StillroomError(
                f"{source}: YAML expands to more than {MAX_YAML_NODES:,} values (aliases "
                "repeated?); write the recipe out plainly"
            )


def safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, bounded in depth and expansion (see _check_yaml_size)."""
    _check_yaml_size(text, source)
    return yaml.safe_load(text)
