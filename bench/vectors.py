"""Benchmark of vectors in the item encoding: JSON floats (before) vs packed float32 (now).

    python bench/vectors.py [--dim 768] [--repeat 7]

One item of an embeddings group: a `--dim` embedding (random, as a model gives) and three
scalars (a model name, a score, a version). Rows, each the best of `--repeat` runs of a
loop (the best is the least disturbed by other processes; the machine's noise only adds):
  encode  features -> stored bytes: the old path (each float checked by `coerce`, the
          array written as JSON floats) against `codec.encode` (checked and packed);
  decode  stored bytes -> wire values (`codec.decode`, the one reader of both forms):
          an old JSON item against a packed one;
  answer  decode + `project` + `orjson.dumps` of the answer's features: the work serving
          does for the item once (its rendered JSON is then cached), and the JSON's size.
Bytes per item: the stored value (a JSON item of 768 floats is over the 8 KiB limit, so
before this change it was refused: its row is what it would have cost).
Then the ways to read packed floats that `types.unpack_vector` chose from.

`vector_rows()` gives the rows to other benches: (name, us per item, bytes per item).
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from featureplane.codec import decode, encode, project  # noqa: E402
from featureplane.spec import FeatureGroup  # noqa: E402
from featureplane.types import FeatureType, coerce  # noqa: E402

Row = tuple[str, float, int]
"""(name, microseconds per item, bytes per item)."""


def embeddings_group(dim: int) -> FeatureGroup:
    return FeatureGroup.model_validate(
        {
            "name": "article_embeddings",
            "entity": "article",
            "kind": "latest",
            "features": [
                {"name": "embedding", "type": f"vector<float,{dim}>"},
                {"name": "model", "type": "string"},
                {"name": "score", "type": "float"},
                {"name": "version", "type": "int"},
            ],
        }
    )


def features_of(dim: int, seed: int = 1) -> dict[str, Any]:
    rnd = random.Random(seed)
    return {
        "embedding": [rnd.gauss(0.0, 0.05) for _ in range(dim)],
        "model": "clip-vit-b32-2026-11",
        "score": 0.87,
        "version": 12,
    }


_FLOAT = FeatureType("float")


def old_encode(group: FeatureGroup, features: dict[str, Any]) -> bytes:
    """The encoding before packing, vectors as JSON floats each checked by `coerce` (the
    8 KiB limit left out, so that a 768-d item can be measured at all)."""
    values: list[Any] = [None] * len(group.features)
    for name, value in features.items():
        i = group.index[name]
        t = group.features[i].type
        if t.kind == "vector":
            values[i] = [coerce(_FLOAT, v, f"{name}[{k}]") for k, v in enumerate(value)]
        else:
            values[i] = coerce(t, value, name)
    return orjson.dumps(values)


def best_us(fn: Callable[[], object], repeat: int, budget_s: float = 0.05) -> float:
    """Microseconds per call: the best of `repeat` loops of about `budget_s` each."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s / 5:
        fn()
        n += 1
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n * 5):
            fn()
        best = min(best, (time.perf_counter() - t) / (n * 5))
    return best * 1e6


def vector_rows(dim: int = 768, repeat: int = 7) -> list[Row]:
    """Encode, decode and answer of one `dim`-d embedding item with 3 scalars, before/now."""
    group = embeddings_group(dim)
    features = features_of(dim)
    old, packed = old_encode(group, features), encode(group, features)
    names = ["embedding", "model"]

    def answer(value: bytes) -> bytes:
        return orjson.dumps(project(group, decode(group, value), names))

    d = f"{dim}-d + 3 scalars"
    cases: list[tuple[str, Callable[[], object], int]] = [
        (f"encode {d}, JSON floats (before)", lambda: old_encode(group, features), len(old)),
        (f"encode {d}, packed float32 (now)", lambda: encode(group, features), len(packed)),
        (f"decode {d}, JSON floats (old items)", lambda: decode(group, old), len(old)),
        (f"decode {d}, packed float32 (now)", lambda: decode(group, packed), len(packed)),
        (f"answer JSON of a {dim}-d item, from JSON floats", lambda: answer(old), len(answer(old))),
        (
            f"answer JSON of a {dim}-d item, from packed",
            lambda: answer(packed),
            len(answer(packed)),
        ),
    ]
    return [(name, best_us(fn, repeat), size) for name, fn, size in cases]


def reader_rows(dim: int = 768, repeat: int = 7) -> list[Row]:
    """Ways to turn `dim` packed little-endian float32s into a list of Python floats."""
    raw = struct.pack(f"<{dim}f", *features_of(dim)["embedding"])
    view = memoryview(raw)
    many = struct.Struct(f"<{dim}f")

    def by_array() -> list[float]:
        a = array("f")
        a.frombytes(view)
        return a.tolist()

    cases: list[tuple[str, Callable[[], object]]] = [
        ("array('f').frombytes + tolist (types.unpack_vector)", by_array),
        ("memoryview.cast('f').tolist", lambda: view.cast("f").tolist()),
        ("struct.Struct.unpack, list()", lambda: list(many.unpack(raw))),
    ]
    rows: list[Row] = [(name, best_us(fn, repeat), len(raw)) for name, fn in cases]
    try:
        import numpy as np  # not a dependency of featureplane: measured when present
    except ImportError:
        return rows
    rows.append(
        (
            "numpy.frombuffer + tolist (numpy not a dependency)",
            best_us(lambda: np.frombuffer(raw, dtype="<f4").tolist(), repeat),
            len(raw),
        )
    )
    return rows


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n{title:58} {'us/item':>9} {'bytes/item':>11}")
    for name, us, size in rows:
        print(f"{name:58} {us:9.1f} {size:11,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    print_rows("item encoding of vectors", vector_rows(args.dim, args.repeat))
    print_rows(f"reading {args.dim} packed float32s", reader_rows(args.dim, args.repeat))


if __name__ == "__main__":
    main()
