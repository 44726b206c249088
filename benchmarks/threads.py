"""`stillroom demo` wall time by thread setting, on a quiet machine and on one kept busy.

    python benchmarks/threads.py --reps 2             # busy = as many spinning processes as cores

Each repetition runs `stillroom demo --no-report --no-progress` once per setting (auto, 1, and
one thread per core, torch's own default), interleaved, first with the machine otherwise idle and
then with `--busy` processes spinning on the CPU (a shared machine: other users' jobs). The
medians over repetitions and the threads `auto` chose are written to
benchmarks/results/threads.{json,md}. OMP_NUM_THREADS is removed from the children's environment
(it would override `auto`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

RESULTS = Path(__file__).parent / "results"


def spin(stop) -> None:
    while not stop.is_set():
        pass


def demo_seconds(threads: str, folder: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "stillroom.cli", "demo", "--threads", threads]
    command += ["--out", str(folder), "--no-report", "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    from stillroom.threads import cores

    settings = ["auto", "1", str(cores())]
    times: dict[str, dict[str, list[float]]] = {}
    for load in ("quiet", "busy"):
        stop = multiprocessing.Event()
        spinners = [
            multiprocessing.Process(target=spin, args=(stop,), daemon=True)
            for _ in range(args.busy if load == "busy" else 0)
        ]
        for process in spinners:
            process.start()
        if spinners:
            time.sleep(65)  # the 1-minute load average `auto` reads has to see them
        times[load] = {s: [] for s in settings}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.reps):
                for setting in settings:
                    seconds = demo_seconds(setting, Path(tmp) / f"{load}-{setting}-{rep}")
                    times[load][setting].append(seconds)
                    print(f"{load} rep {rep} threads {setting}: {seconds:.1f} s", flush=True)
        stop.set()
        for process in spinners:
            process.join()
    medians = {load: {s: statistics.median(v) for s, v in d.items()} for load, d in times.items()}
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(
        json.dumps({"machine": info, "busy_processes": args.busy, "seconds": times}, indent=2)
    )
    lines = [
        "# `stillroom demo` wall time by threads",
        "",
        f"`python benchmarks/threads.py --reps {args.reps}` on {info} ({cores()} cores); "
        f"busy = {args.busy} spinning processes; medians of "
        f"{args.reps} interleaved repetitions (seconds).",
        "",
        "| machine | " + " | ".join(f"threads {s}" for s in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for load, row in medians.items():
        lines.append(f"| {load} | " + " | ".join(f"{row[s]:.1f}" for s in settings) + " |")
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
