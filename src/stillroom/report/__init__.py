"""The compression report of a run folder: numbers (report.json), figures (PNG) and one
self-contained HTML page. `build_report(run_dir, out_dir=None) -> Path` of report.html."""

from stillroom.report.build import build_report, measure_run
from stillroom.report.numbers import ECE_BINS, TIMING, Timing, reliability
from stillroom.report.summary_report import write_index

__all__ = [
    "ECE_BINS",
    "TIMING",
    "Timing",
    "build_report",
    "measure_run",
    "reliability",
    "write_index",
]
