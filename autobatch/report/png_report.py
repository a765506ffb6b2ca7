"""The PNG report of a study (``autobatch report``): its four views written as image files."""

from __future__ import annotations

from pathlib import Path

from autobatch.report.figures import matplotlib_figures
from autobatch.report.plot_data import StudyPlotData

#: the PNG files ``autobatch report`` writes, by view
REPORT_FILES = {
    "pareto": "pareto_front.png",
    "throughput": "throughput_vs_micro_batch.png",
    "memory": "peak_memory_vs_micro_batch.png",
    "learning_rate": "learning_rate_vs_loss.png",
}


def write_report(study, out_dir: str | Path, result=None, dpi: int = 120) -> list[Path]:
    """Write the four views of ``study`` as PNG files into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = StudyPlotData.from_study(study, result)
    paths = []
    for view, figure in matplotlib_figures(data).items():
        path = out / REPORT_FILES[view]
        figure.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
