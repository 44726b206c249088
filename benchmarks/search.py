"""stillroom search on digits (5% labels): the Pareto front of the student's shape, and the chosen
student at <= 50% of the starting student's latency.

    OMP_NUM_THREADS=1 python benchmarks/search.py            # 16 candidates, 3 seeds

recipes/digits_search.yaml: a CNN teacher (151k parameters), the starting student a small CNN
(channels 16-32, hidden 64; 38k). NSGA-II draws MLP and CNN students (depth 1-2, widths), each
distilled 15 epochs from one teacher store, scored on the validation split, exported to ONNX and
timed (ONNX Runtime and PyTorch, batch 1 and 64, 1 thread, median). Budget: latency_ms=50%
(PyTorch, batch 1, of the starting student: ONNX Runtime's batch-1 floor, ~11 us of call
overhead, is above half the CNN's ~16 us there). The chosen candidate and the starting student
are retrained on the full schedule (60 epochs), distilled and from labels alone, on 3 seeds
(each seed its own split and teacher). Every other point of the front is retrained the same way
(from the same per-seed teachers), so the front shows where distillation helps and where not.

Writes benchmarks/results/search.json|md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from common import machine
from stillroom.results import describe
from stillroom.tune.runs import run_classic
from stillroom.tune.search import search
from stillroom.tune.space import with_values

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "digits_search.yaml"


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", default="latency_ms=50%")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_search")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--front-minutes", type=float, default=6.0, help="time for retraining other front points"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    result = search(
        RECIPE,
        [f"search.seeds={args.seeds}"],
        args.run_dir,
        budget=args.budget,
        trials=args.trials,
        force=True,
        progress=True,
    )
    search_seconds = time.perf_counter() - started
    payload = json.loads((args.run_dir / "results.json").read_text())
    comparison, metric = result.comparison, result.metric
    seeds = sorted(comparison["seeds"], key=int)
    tree = yaml.safe_load(RECIPE.read_text())
    tree.pop("search")

    # every other front point on the full schedule, distilled and from labels alone
    front_rows, skipped = [], []
    front_started = time.perf_counter()
    for row in result.front:
        entry = {
            "trial": row["number"],
            "student": describe(row["spec"]),
            "starting": row["starting_student"],
            "chosen": row["number"] == result.chosen["number"],
            "val_short": row["value"],
            "costs": row["costs"],
        }
        if entry["chosen"]:
            kd = [comparison["seeds"][s]["tuned"] for s in seeds]
            scratch = [comparison["seeds"][s]["tuned_scratch"] for s in seeds]
        elif entry["starting"]:
            kd = [comparison["seeds"][s]["start"] for s in seeds]
            scratch = [comparison["seeds"][s]["scratch"] for s in seeds]
        elif time.perf_counter() - front_started > args.front_minutes * 60:
            skipped.append(row["number"])
            front_rows.append(entry)
            continue
        else:
            kd, scratch = [], []
            for s in seeds:
                teacher = args.run_dir / "final" / f"start-seed{s}" / "teacher"
                point = with_values(
                    tree, {**row["values"], "seed": int(s), "teacher.checkpoint": str(teacher)}
                )
                point["name"] = f"front_trial{row['number']}"
                done = run_classic(
                    point, args.run_dir / "bench_front" / f"trial{row['number']}-seed{s}", "front"
                )
                kd.append(done["models"]["student_kd"][metric])
                scratch.append(done["models"]["student_scratch"][metric])
        entry |= {
            "test_kd": _stats(kd),
            "test_scratch": _stats(scratch),
            "kd_minus_scratch": _stats([a - b for a, b in zip(kd, scratch, strict=True)]),
            "kd": kd,
            "scratch": scratch,
        }
        front_rows.append(entry)

    start, chosen = payload["start_costs"], result.chosen["costs"]
    out = {
        "machine": machine(),
        "note": "2 shared cores under contention from other jobs (OMP_NUM_THREADS=1); latency: "
        "median of 100 batch-1 calls (10 at batch 64) after warm-up, 1 thread",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "budget": result.budget,
        "limit_ms": result.limit,
        "trials": result.trials,
        "seeds": [int(s) for s in seeds],
        "search_seconds": round(search_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "start_costs": start,
        "chosen": {"trial": result.chosen["number"], "spec": result.chosen["spec"], **chosen},
        "latency_share_of_start": chosen["latency_ms"] / start["latency_ms"],
        "comparison": comparison,
        "front": front_rows,
        "front_not_retrained": skipped,
        "candidates": payload["candidates"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "search.md").write_text(render(out, metric) + "\n")
    print(render(out, metric))


def render(out: dict, metric: str) -> str:
    c, s = out["comparison"], out["start_costs"]
    ch = out["chosen"]
    seeds = ", ".join(map(str, out["seeds"]))

    def ms(d: dict) -> str:
        return f"{d['mean']:.4f} +- {d['std']:.4f}"

    lines = [
        f"# stillroom search: digits, 5% labels, budget {out['budget']} "
        f"(limit {out['limit_ms']:.4f} ms, PyTorch batch 1)",
        "",
        f"Machine: {out['machine']}. {out['note']}. {out['trials']} candidates, search "
        f"{out['search_seconds']:.0f} s, everything {out['total_seconds']:.0f} s (wall, shared).",
        "",
        f"## Chosen vs starting student, test {metric}, full schedule, seeds {seeds}",
        "",
        "| model | test accuracy | parameters | ONNX KB | ONNX Runtime ms b1 | PyTorch ms b1 |",
        "|---|---|---|---|---|---|",
        f"| teacher (CNN 32-64, 128) | {ms(c['teacher'])} | - | - | - | - |",
        f"| starting student, from labels | {ms(c['scratch'])} | {s['parameters']:,} | "
        f"{s['size_kb']:.1f} | {s['onnxruntime_ms']:.4f} | {s['pytorch_ms']:.4f} |",
        f"| starting student, distilled | {ms(c['start'])} | {s['parameters']:,} | "
        f"{s['size_kb']:.1f} | {s['onnxruntime_ms']:.4f} | {s['pytorch_ms']:.4f} |",
        f"| chosen ({describe(ch['spec'])}), from labels | {ms(c['tuned_scratch'])} | "
        f"{ch['parameters']:,} | {ch['size_kb']:.1f} | {ch['onnxruntime_ms']:.4f} | "
        f"{ch['pytorch_ms']:.4f} |",
        f"| chosen ({describe(ch['spec'])}), distilled | {ms(c['tuned'])} | "
        f"{ch['parameters']:,} | {ch['size_kb']:.1f} | {ch['onnxruntime_ms']:.4f} | "
        f"{ch['pytorch_ms']:.4f} |",
        "",
        f"The chosen student runs at {out['latency_share_of_start']:.0%} of the starting "
        "student's PyTorch batch-1 latency and at "
        f"{ch['onnxruntime_ms'] / s['onnxruntime_ms']:.0%} of its ONNX Runtime one (measured "
        "in the same process, the same way).",
        "",
        "## Pareto front: validation accuracy (15 epochs) against PyTorch batch-1 latency",
        "",
        "Each front point retrained on the full schedule (60 epochs), distilled and from labels "
        "alone, from the same per-seed teachers; kd - scratch > 0 where distillation helps.",
        "",
        "| trial | student | val (short) | parameters | ONNX KB | ORT ms b1 | ORT ms b64 | "
        "PyTorch ms b1 | PyTorch ms b64 | test kd | test scratch | kd - scratch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in out["front"]:
        k = row["costs"]
        tag = " (start)" if row["starting"] else " (chosen)" if row["chosen"] else ""
        tests = (
            f"{ms(row['test_kd'])} | {ms(row['test_scratch'])} | {ms(row['kd_minus_scratch'])}"
            if "test_kd" in row
            else "not retrained (time) | | "
        )
        lines.append(
            f"| {row['trial']} | {row['student']}{tag} | {row['val_short']:.4f} | "
            f"{k['parameters']:,} | {k['size_kb']:.1f} | {k['onnxruntime_ms']:.4f} | "
            f"{k['onnxruntime_ms_batch_64']:.3f} | {k['pytorch_ms']:.4f} | "
            f"{k['pytorch_ms_batch_64']:.3f} | {tests} |"
        )
    retrained = [r for r in out["front"] if "kd_minus_scratch" in r]
    no_help = [r for r in retrained if r["kd_minus_scratch"]["mean"] <= 0]
    lines += [
        "",
        f"Distillation does not help (kd - scratch <= 0) at {len(no_help)} of {len(retrained)} "
        "retrained front points"
        + (": trials " + ", ".join(str(r["trial"]) for r in no_help) if no_help else "")
        + ". The validation split is small (179 samples) and near its ceiling after 15 epochs, "
        "so the short-schedule values that order the front differ by a few samples; batch-1 "
        "latencies are ~10-100 us and move by several us under the machine's contention (one "
        "candidate's ONNX Runtime figure above the starting student's is such noise).",
        "",
        f"Not retrained (time): {out['front_not_retrained'] or 'none'}. All {out['trials']} "
        "candidates with every cost: search.json.",
    ]
    return "\n".join(lines)


def rerender(results: Path) -> None:
    """Rewrite search.md from search.json (no training)."""
    out = json.loads((results / "search.json").read_text())
    (results / "search.md").write_text(render(out, out["comparison"]["metric"]) + "\n")


if __name__ == "__main__":
    main()
