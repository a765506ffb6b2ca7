"""Plots of a study: PNG files for a report (matplotlib) and graphs kept in the study for optuna-dashboard (plotly).

Both draw the same four views from one :class:`StudyPlotData`: the Pareto front, throughput
against micro-batch (a line per accumulation setting), peak memory against micro-batch with the
budget and the probe's fitted model, and validation loss against learning rate.

Infeasible trials are stored with placeholder objective values (0 samples/s, loss 1e3) so the
sampler learns where the wall is. Plotted at those values they would squash every axis (the
dashboard's own Pareto plot does just that), so they are drawn apart, by kind, and never on
the front.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from autobatch.core.memory import format_bytes
from autobatch.search.objectives import measured

#: what each kind of infeasible trial is called in legends (the order of the side panel)
INFEASIBLE_KINDS = {
    "oom": "out of memory",
    "skipped": "skipped: predicted over budget",
    "over_budget": "over the memory budget",
    "diverged": "diverged (loss not finite)",
    "failed": "failed (error)",
}
#: the PNG files ``autobatch report`` writes, by view
REPORT_FILES = {
    "pareto": "pareto_front.png",
    "throughput": "throughput_vs_micro_batch.png",
    "memory": "peak_memory_vs_micro_batch.png",
    "learning_rate": "learning_rate_vs_loss.png",
}
#: the most of a study's time that redrawing its dashboard plots after trials may take
PLOT_TIME_SHARE = 0.05
#: ids of the graphs saved into the study (optuna-dashboard overwrites a graph with the same id)
DASHBOARD_GRAPH_IDS = {view: f"autobatch-{view.replace('_', '-')}" for view in REPORT_FILES}

# (storage, study id) -> (monotonic time of the last redraw, seconds it took), for the throttle
_last_redraw: dict[tuple[int, int], tuple[float, float]] = {}
_SHORT_KINDS = {"oom": "OOM", "skipped": "skipped", "over_budget": "over", "diverged": "diverged", "failed": "failed"}
_MARKERS = {"oom": "X", "skipped": "s", "over_budget": "D", "diverged": "^", "failed": "v"}
_PLOTLY_MARKERS = {"oom": "x", "skipped": "square-open", "over_budget": "diamond", "diverged": "triangle-up", "failed": "triangle-down"}
_INFEASIBLE_COLOR = "#d62728"
_RECOMMENDED_COLOR = "#ffbf00"
_FRONT_COLOR = "#1f77b4"
_DOMINATED_COLOR = "#9e9e9e"


@dataclass
class TrialPoint:
    """One trial as the plots see it: its config, what it measured, and what kind of outcome it was."""

    number: int
    micro_batch_size: int
    accumulation_steps: int
    effective_batch_size: int
    learning_rate: float
    kind: str  # "feasible" or a key of INFEASIBLE_KINDS
    throughput: float | None  # measured samples/s; None when the trial trained nothing
    val_loss: float | None  # only for feasible trials
    peak_memory_bytes: int | None
    predicted_peak_bytes: int | None
    on_front: bool = False


@dataclass
class StudyPlotData:
    """What the four views need from a study, read once."""

    study_name: str
    title: str
    trials: list[TrialPoint]
    recommended: int | None  # trial number
    memory_budget_bytes: int
    safety_margin: float
    max_micro_batch: int
    intercept_bytes: float | None
    bytes_per_sample: float | None
    probes: list[dict] = field(default_factory=list)

    @classmethod
    def from_study(cls, study, result=None) -> "StudyPlotData":
        """Read ``study``; ``result`` (a :class:`~autobatch.search.study.TuneResult` of it) saves summarizing again."""
        from autobatch.search.study import summarize

        result = result if result is not None else summarize(study, "")
        settings = study.user_attrs.get("autobatch", {})
        probe = result.probe or {}
        model = probe.get("memory_model") or {}
        trials = trial_points(study, front={p["trial_number"] for p in result.pareto_front})
        return cls(
            study_name=study.study_name,
            title=f"{settings.get('task', study.study_name)} on {settings.get('backend', '?')} ({settings.get('device', '?')})",
            trials=trials,
            recommended=result.recommended["trial_number"] if result.recommended else None,
            memory_budget_bytes=result.memory_budget_bytes,
            safety_margin=float(settings.get("safety_margin", probe.get("safety_margin", 0.0))),
            max_micro_batch=result.max_micro_batch,
            intercept_bytes=model.get("intercept_bytes"),
            bytes_per_sample=model.get("bytes_per_sample"),
            probes=list(probe.get("probes", [])),
        )

    @property
    def feasible(self) -> list[TrialPoint]:
        return [t for t in self.trials if t.kind == "feasible"]

    @property
    def infeasible(self) -> list[TrialPoint]:
        return [t for t in self.trials if t.kind != "feasible"]

    @property
    def recommended_trial(self) -> TrialPoint | None:
        return next((t for t in self.trials if t.number == self.recommended), None)

    def predicted_peak(self, micro_batch: float) -> float | None:
        if self.intercept_bytes is None or self.bytes_per_sample is None:
            return None
        return self.intercept_bytes + self.bytes_per_sample * micro_batch


def write_report(study, out_dir: "str | Path", result=None, dpi: int = 120) -> list[Path]:
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


def matplotlib_figures(data: StudyPlotData) -> dict:
    """The four views as matplotlib Figures (no pyplot: nothing global, no display needed)."""
    return {
        "pareto": pareto_figure(data),
        "throughput": throughput_figure(data),
        "memory": memory_figure(data),
        "learning_rate": learning_rate_figure(data),
    }


def save_dashboard_plots(study, result=None) -> None:
    """Keep the four views current in ``study`` as optuna-dashboard graphs (needs plotly)."""
    from optuna_dashboard import save_plotly_graph_object

    data = StudyPlotData.from_study(study, result)
    for view, figure in plotly_figures(data).items():
        save_plotly_graph_object(study, figure, graph_object_id=DASHBOARD_GRAPH_IDS[view])


def save_dashboard_plots_quietly(study, result=None, *, throttle: bool = False) -> None:
    """:func:`save_dashboard_plots` for the study loop: plots must never stop a study.

    Without plotly (the ``dashboard`` extra) there is nothing to do; any other failure is
    reported as a warning and the study goes on. With ``throttle`` (after a trial), the plots
    are redrawn only when that keeps their cost under :data:`PLOT_TIME_SHARE` of the time
    since the last redraw: every trial of a real workload, every few of a toy one.
    """
    try:
        import plotly.graph_objects  # noqa: F401  (imported before the clock starts: paid once)
    except ImportError:
        return
    key = (id(study._storage), study._study_id)
    started = time.monotonic()
    if throttle and key in _last_redraw:
        when, cost = _last_redraw[key]
        if started - when < cost / PLOT_TIME_SHARE:
            return
    try:
        save_dashboard_plots(study, result)
    except Exception as error:  # a plot is decoration; the trial results are already stored
        warnings.warn(f"autobatch: could not save the dashboard plots: {type(error).__name__}: {error}", stacklevel=2)
    finished = time.monotonic()
    # The least a redraw has taken: the first one pays for plotly's lazy imports.
    cost = min(finished - started, _last_redraw.get(key, (0.0, math.inf))[1])
    _last_redraw[key] = (finished, cost)


# --- matplotlib -------------------------------------------------------------------------------


def _figure(width: float = 9.0, height: float = 5.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def pareto_figure(data: StudyPlotData):
    """Feasible trials with their Pareto front and the recommendation; infeasible ones in a panel apart."""
    figure = _figure(12.0, 6.0)
    grid = figure.add_gridspec(1, 2, width_ratios=(3.2, 1.0))
    axes = figure.add_subplot(grid[0])
    side = figure.add_subplot(grid[1])
    figure.suptitle(f"Pareto front: throughput vs validation loss\n{_wrapped(data.title, 110)}", fontsize=12)

    front = sorted((t for t in data.feasible if t.on_front), key=lambda t: t.throughput)
    dominated = [t for t in data.feasible if not t.on_front]
    if dominated:
        axes.scatter(
            [t.throughput for t in dominated], [t.val_loss for t in dominated], s=36, color=_DOMINATED_COLOR,
            alpha=0.8, label=f"feasible, dominated ({len(dominated)})", zorder=2,
        )
    if front:
        axes.plot(
            [t.throughput for t in front], [t.val_loss for t in front], "-o", color=_FRONT_COLOR, markersize=7,
            drawstyle="steps-pre", label=f"feasible Pareto front ({len(front)})", zorder=3,
        )
        for t in front:
            axes.annotate(f"#{t.number}", (t.throughput, t.val_loss), textcoords="offset points", xytext=(5, 5), fontsize=8)
    _star(axes, data, lambda t: (t.throughput, t.val_loss))
    if not data.feasible:
        axes.text(0.5, 0.5, "no feasible trial yet", transform=axes.transAxes, ha="center", va="center", color="gray")
    axes.set_title("feasible trials (within the memory budget)", fontsize=11)
    axes.set_xlabel("throughput (samples/s), higher is better")
    axes.set_ylabel("validation loss, lower is better")
    axes.grid(alpha=0.3)

    _infeasible_panel(side, data)
    handles, labels = [], []
    for panel in (axes, side):
        more_handles, more_labels = panel.get_legend_handles_labels()
        handles += more_handles
        labels += more_labels
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    return figure


def _infeasible_panel(axes, data: StudyPlotData) -> None:
    """Infeasible trials by kind, at their micro-batch size: where the wall stopped them."""
    kinds = [kind for kind in INFEASIBLE_KINDS if any(t.kind == kind for t in data.infeasible)]
    total = len(data.infeasible)
    axes.set_title(f"infeasible trials, excluded ({total})", fontsize=11)
    if data.max_micro_batch:
        axes.axhline(data.max_micro_batch, color="black", linestyle=":", linewidth=1.2,
                     label=f"memory wall (probe): {data.max_micro_batch}")
    for column, kind in enumerate(kinds):
        trials = [t for t in data.infeasible if t.kind == kind]
        offsets = _spread(len(trials))
        axes.scatter(
            [column + offset for offset in offsets], [t.micro_batch_size for t in trials], marker=_MARKERS[kind],
            s=60, color=_INFEASIBLE_COLOR, alpha=0.85, label=f"{INFEASIBLE_KINDS[kind]} ({len(trials)})",
            gid=f"infeasible:{kind}", zorder=3,
        )
    axes.set_xticks(range(len(kinds)), [_SHORT_KINDS[k] for k in kinds], fontsize=9)
    axes.set_xlim(-0.6, max(len(kinds), 1) - 0.4)
    axes.set_ylabel("micro-batch size (samples)")
    if total:
        axes.set_yscale("log", base=2)
        axes.yaxis.set_major_formatter(_plain_number_formatter())
    else:
        axes.text(0.5, 0.5, "none", transform=axes.transAxes, ha="center", va="center", color="gray")
    axes.grid(alpha=0.3, axis="y")


def throughput_figure(data: StudyPlotData):
    """Measured throughput against micro-batch size, one line per accumulation setting."""
    figure = _figure()
    axes = figure.add_subplot()
    _title(axes, "Throughput vs micro-batch size", data)
    measured = [t for t in data.trials if t.throughput and t.kind in ("feasible", "diverged")]
    for accumulation in sorted({t.accumulation_steps for t in measured}):
        by_micro: dict[int, list[float]] = {}
        for t in measured:
            if t.accumulation_steps == accumulation:
                by_micro.setdefault(t.micro_batch_size, []).append(t.throughput)
        micro = sorted(by_micro)
        axes.plot(micro, [sum(by_micro[m]) / len(by_micro[m]) for m in micro], "-o", markersize=5,
                  label=f"accumulation {accumulation}")
    stopped = [t for t in data.infeasible if t.kind in ("oom", "skipped", "over_budget")]
    if stopped:
        axes.scatter([t.micro_batch_size for t in stopped], [0] * len(stopped), marker="x", color=_INFEASIBLE_COLOR,
                     s=50, clip_on=False, zorder=4, label=f"out of memory or skipped, no throughput ({len(stopped)})")
    _wall_line(axes, data)
    _star(axes, data, lambda t: (t.micro_batch_size, t.throughput))
    if not measured:
        axes.text(0.5, 0.5, "no trial measured yet", transform=axes.transAxes, ha="center", va="center", color="gray")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(_plain_number_formatter())
    axes.set_ylim(bottom=0)
    axes.set_xlabel("micro-batch size (samples)")
    axes.set_ylabel("throughput (samples/s)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize=9)
    return figure


def memory_figure(data: StudyPlotData):
    """Peak memory against micro-batch: search trials, probe runs, the fitted model, the budget."""
    figure = _figure()
    axes = figure.add_subplot()
    _title(axes, "Peak memory vs micro-batch size", data)
    unit_name, unit = ("GiB", 1024**3) if data.memory_budget_bytes >= 4 * 1024**3 else ("MiB", 1024**2)
    micro_batches = [t.micro_batch_size for t in data.trials] + [p["micro_batch"] for p in data.probes] + [data.max_micro_batch]
    right = max(micro_batches) * 1.15 if any(micro_batches) else 1

    if data.predicted_peak(0) is not None:
        xs = [0, right]
        axes.plot(xs, [data.predicted_peak(x) / unit for x in xs], color="#2ca02c", linewidth=1.5,
                  label=f"fitted model: {format_bytes(data.intercept_bytes)} + {format_bytes(data.bytes_per_sample)} × micro-batch")
    fitted = [p for p in data.probes if p.get("status") == "ok" and p.get("peak_memory_bytes")]
    if fitted:
        axes.scatter([p["micro_batch"] for p in fitted], [p["peak_memory_bytes"] / unit for p in fitted], marker="s",
                     s=50, facecolor="none", edgecolor="black", linewidth=1.5, zorder=4, label=f"probe runs ({len(fitted)})")
    probe_ooms = [p for p in data.probes if p.get("status") == "oom"]
    ran = [t for t in data.trials if t.peak_memory_bytes and t.kind in ("feasible", "diverged")]
    if ran:
        axes.scatter([t.micro_batch_size for t in ran], [t.peak_memory_bytes / unit for t in ran], s=30, color=_FRONT_COLOR,
                     alpha=0.8, zorder=3, label=f"search trials ({len(ran)})")
    ooms = [t for t in data.trials if t.kind in ("oom", "over_budget")]
    cap = data.memory_budget_bytes / unit
    if ooms or probe_ooms:
        xs = [t.micro_batch_size for t in ooms] + [p["micro_batch"] for p in probe_ooms]
        ys = [(t.peak_memory_bytes / unit if t.peak_memory_bytes else cap) for t in ooms] + [
            (p["peak_memory_bytes"] / unit if p.get("peak_memory_bytes") else cap) for p in probe_ooms
        ]
        axes.scatter(xs, ys, marker="X", s=60, color=_INFEASIBLE_COLOR, zorder=4,
                     label=f"out of memory (trials {len(ooms)}, probes {len(probe_ooms)})")
    skipped = [t for t in data.trials if t.kind == "skipped" and t.predicted_peak_bytes]
    if skipped:
        axes.scatter([t.micro_batch_size for t in skipped], [t.predicted_peak_bytes / unit for t in skipped], marker="s",
                     s=40, facecolor="none", edgecolor=_INFEASIBLE_COLOR, zorder=3,
                     label=f"skipped, at their predicted peak ({len(skipped)})")
    if data.memory_budget_bytes:
        axes.axhline(cap, color=_INFEASIBLE_COLOR, linewidth=1.5, label=f"memory budget {format_bytes(data.memory_budget_bytes)}")
        if data.safety_margin:
            axes.axhline(cap * (1 - data.safety_margin), color="#ff7f0e", linestyle="--", linewidth=1.2,
                         label=f"probe limit (budget less {data.safety_margin:.0%} margin)")
    _wall_line(axes, data)
    _star(axes, data, lambda t: (t.micro_batch_size, (t.peak_memory_bytes or 0) / unit))
    axes.set_xlim(0, right)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("micro-batch size (samples)")
    axes.set_ylabel(f"peak memory ({unit_name})")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=8)
    return figure


def learning_rate_figure(data: StudyPlotData):
    """Validation loss against learning rate (log scale), coloured by effective batch size."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import LogFormatter, NullFormatter

    figure = _figure()
    axes = figure.add_subplot()
    _title(axes, "Validation loss vs learning rate", data)
    feasible = data.feasible
    if feasible:
        batches = [t.effective_batch_size for t in feasible]
        norm = LogNorm(vmin=min(batches), vmax=max(max(batches), min(batches) + 1))
        points = axes.scatter([t.learning_rate for t in feasible], [t.val_loss for t in feasible], c=batches, cmap="viridis",
                              norm=norm, s=40, edgecolor="black", linewidth=0.4, zorder=3,
                              label=f"feasible trials ({len(feasible)})")
        colorbar = figure.colorbar(points, ax=axes, label="effective batch size (samples)")
        powers = range(int(math.log2(norm.vmin)), int(math.ceil(math.log2(norm.vmax))) + 1)
        colorbar.set_ticks([2**k for k in powers if norm.vmin <= 2**k <= norm.vmax] or [norm.vmin, norm.vmax])
        colorbar.ax.yaxis.set_major_formatter(_plain_number_formatter())
        colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        axes.text(0.5, 0.5, "no feasible trial yet", transform=axes.transAxes, ha="center", va="center", color="gray")
    diverged = [t for t in data.trials if t.kind == "diverged"]
    if diverged:
        # No finite loss to plot: mark them on the top edge, at their learning rate.
        axes.scatter([t.learning_rate for t in diverged], [1.0] * len(diverged), marker="^", s=60, color=_INFEASIBLE_COLOR,
                     transform=axes.get_xaxis_transform(), clip_on=False, zorder=4,
                     label=f"diverged, loss not finite ({len(diverged)})")
    _star(axes, data, lambda t: (t.learning_rate, t.val_loss))
    axes.set_xscale("log")
    rates = [t.learning_rate for t in feasible + diverged]
    if rates:  # the diverged markers sit on the axes' edge and do not widen the limits themselves
        axes.set_xlim(min(rates) / 1.4, max(rates) * 1.4)
    axes.xaxis.set_major_formatter(LogFormatter())
    axes.xaxis.set_minor_formatter(LogFormatter())
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("validation loss")
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize=9)
    return figure


def _title(axes, main: str, data: StudyPlotData) -> None:
    axes.set_title(f"{main}\n{_wrapped(data.title, 80)}", fontsize=12)


def _wrapped(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def _star(axes, data: StudyPlotData, where) -> None:
    trial = data.recommended_trial
    if trial is None:
        return
    x, y = where(trial)
    axes.scatter([x], [y], marker="*", s=320, color=_RECOMMENDED_COLOR, edgecolor="black", linewidth=1.0, zorder=5,
                 label=f"recommended: {_config_text(trial)}")


def _wall_line(axes, data: StudyPlotData) -> None:
    if data.max_micro_batch:
        axes.axvline(data.max_micro_batch, color="black", linestyle=":", linewidth=1.2,
                     label=f"memory wall (probe): micro-batch {data.max_micro_batch}")


def _config_text(trial: TrialPoint) -> str:
    return (f"#{trial.number}, micro-batch {trial.micro_batch_size} × accumulation {trial.accumulation_steps}, "
            f"lr {trial.learning_rate:.3g}")


def _spread(count: int, width: float = 0.5) -> list[float]:
    """Horizontal offsets that keep ``count`` markers in one column apart."""
    if count <= 1:
        return [0.0] * count
    return [-width / 2 + width * i / (count - 1) for i in range(count)]


def _plain_number_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


# --- plotly (optuna-dashboard) ----------------------------------------------------------------


def plotly_figures(data: StudyPlotData) -> dict:
    """The four views as plotly Figures, for optuna-dashboard's study page."""
    return {
        "pareto": plotly_pareto(data),
        "throughput": plotly_throughput(data),
        "memory": plotly_memory(data),
        "learning_rate": plotly_learning_rate(data),
    }


def plotly_pareto(data: StudyPlotData):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(
        rows=1, cols=2, column_widths=[0.75, 0.25], horizontal_spacing=0.1,
        subplot_titles=("feasible trials", f"infeasible, excluded ({len(data.infeasible)})"),
    )
    front = sorted((t for t in data.feasible if t.on_front), key=lambda t: t.throughput)
    dominated = [t for t in data.feasible if not t.on_front]
    figure.add_trace(go.Scatter(
        x=[t.throughput for t in dominated], y=[t.val_loss for t in dominated], mode="markers",
        marker=dict(color=_DOMINATED_COLOR, size=8), name=f"feasible, dominated ({len(dominated)})",
        text=[_hover(t) for t in dominated], hoverinfo="text",
    ), row=1, col=1)
    figure.add_trace(go.Scatter(
        x=[t.throughput for t in front], y=[t.val_loss for t in front], mode="lines+markers", line_shape="vh",
        marker=dict(color=_FRONT_COLOR, size=9), name=f"feasible Pareto front ({len(front)})",
        text=[_hover(t) for t in front], hoverinfo="text",
    ), row=1, col=1)
    _plotly_star(figure, data, lambda t: (t.throughput, t.val_loss), row=1, col=1)
    kinds = [kind for kind in INFEASIBLE_KINDS if any(t.kind == kind for t in data.infeasible)]
    for column, kind in enumerate(kinds):
        trials = [t for t in data.infeasible if t.kind == kind]
        figure.add_trace(go.Scatter(
            x=[column + offset for offset in _spread(len(trials))], y=[t.micro_batch_size for t in trials],
            mode="markers", marker=dict(color=_INFEASIBLE_COLOR, size=10, symbol=_PLOTLY_MARKERS[kind]),
            name=f"{INFEASIBLE_KINDS[kind]} ({len(trials)})", text=[_hover(t) for t in trials], hoverinfo="text",
        ), row=1, col=2)
    if data.max_micro_batch and kinds:
        figure.add_trace(_plotly_line([-0.5, len(kinds) - 0.5], [data.max_micro_batch] * 2,
                                      f"memory wall (probe): {data.max_micro_batch}"), row=1, col=2)
    figure.update_xaxes(tickvals=list(range(len(kinds))), ticktext=[_SHORT_KINDS[k] for k in kinds],
                        range=[-0.6, max(len(kinds), 1) - 0.4], zeroline=False, row=1, col=2)
    figure.update_xaxes(title_text="throughput (samples/s)", row=1, col=1)
    figure.update_yaxes(title_text="validation loss", row=1, col=1)
    figure.update_yaxes(title_text="micro-batch size", type="log", row=1, col=2)
    return _plotly_layout(figure, "Pareto front (infeasible trials apart)")


def plotly_throughput(data: StudyPlotData):
    import plotly.graph_objects as go

    figure = go.Figure()
    measured = [t for t in data.trials if t.throughput and t.kind in ("feasible", "diverged")]
    for accumulation in sorted({t.accumulation_steps for t in measured}):
        trials = sorted((t for t in measured if t.accumulation_steps == accumulation), key=lambda t: t.micro_batch_size)
        figure.add_trace(go.Scatter(
            x=[t.micro_batch_size for t in trials], y=[t.throughput for t in trials], mode="lines+markers",
            name=f"accumulation {accumulation}", text=[_hover(t) for t in trials], hoverinfo="text",
        ))
    _plotly_star(figure, data, lambda t: (t.micro_batch_size, t.throughput))
    if measured and data.max_micro_batch:
        top = max(t.throughput for t in measured)
        figure.add_trace(_plotly_line([data.max_micro_batch] * 2, [0, top], f"memory wall (probe): {data.max_micro_batch}"))
    figure.update_xaxes(title_text="micro-batch size (samples)", type="log")
    figure.update_yaxes(title_text="throughput (samples/s)", rangemode="tozero")
    return _plotly_layout(figure, "Throughput vs micro-batch size")


def plotly_memory(data: StudyPlotData):
    import plotly.graph_objects as go

    mib = 1024**2
    figure = go.Figure()
    micro_batches = [t.micro_batch_size for t in data.trials] + [p["micro_batch"] for p in data.probes] + [data.max_micro_batch]
    right = max(micro_batches) * 1.15 if any(micro_batches) else 1
    if data.predicted_peak(0) is not None:
        figure.add_trace(go.Scatter(
            x=[0, right], y=[data.predicted_peak(0) / mib, data.predicted_peak(right) / mib], mode="lines",
            line=dict(color="#2ca02c"), name="probe's fitted model",
        ))
    fitted = [p for p in data.probes if p.get("status") == "ok" and p.get("peak_memory_bytes")]
    figure.add_trace(go.Scatter(
        x=[p["micro_batch"] for p in fitted], y=[p["peak_memory_bytes"] / mib for p in fitted], mode="markers",
        marker=dict(symbol="square-open", color="black", size=10), name=f"probe runs ({len(fitted)})",
    ))
    ran = [t for t in data.trials if t.peak_memory_bytes and t.kind in ("feasible", "diverged")]
    figure.add_trace(go.Scatter(
        x=[t.micro_batch_size for t in ran], y=[t.peak_memory_bytes / mib for t in ran], mode="markers",
        marker=dict(color=_FRONT_COLOR, size=7), name=f"search trials ({len(ran)})", text=[_hover(t) for t in ran],
        hoverinfo="text",
    ))
    stopped = [t for t in data.infeasible if t.kind in ("oom", "over_budget", "skipped")]
    if stopped:
        figure.add_trace(go.Scatter(
            x=[t.micro_batch_size for t in stopped],
            y=[(t.peak_memory_bytes or t.predicted_peak_bytes or data.memory_budget_bytes) / mib for t in stopped],
            mode="markers", marker=dict(color=_INFEASIBLE_COLOR, size=10, symbol="x"),
            name=f"out of memory or skipped ({len(stopped)})", text=[_hover(t) for t in stopped], hoverinfo="text",
        ))
    if data.memory_budget_bytes:
        budget = data.memory_budget_bytes / mib
        figure.add_trace(_plotly_line([0, right], [budget, budget], f"memory budget {format_bytes(data.memory_budget_bytes)}",
                                      color=_INFEASIBLE_COLOR, dash="solid"))
    if data.max_micro_batch:
        figure.add_trace(_plotly_line([data.max_micro_batch] * 2, [0, data.memory_budget_bytes / mib],
                                      f"memory wall (probe): {data.max_micro_batch}"))
    figure.update_xaxes(title_text="micro-batch size (samples)", range=[0, right])
    figure.update_yaxes(title_text="peak memory (MiB)", rangemode="tozero")
    return _plotly_layout(figure, "Peak memory vs micro-batch size")


def plotly_learning_rate(data: StudyPlotData):
    import plotly.graph_objects as go

    figure = go.Figure()
    feasible = data.feasible
    figure.add_trace(go.Scatter(
        x=[t.learning_rate for t in feasible], y=[t.val_loss for t in feasible], mode="markers",
        marker=dict(size=9, color=[math.log2(t.effective_batch_size) for t in feasible], colorscale="Viridis",
                    showscale=bool(feasible), colorbar=dict(title="log2 effective batch")),
        name=f"feasible trials ({len(feasible)})", text=[_hover(t) for t in feasible], hoverinfo="text",
    ))
    _plotly_star(figure, data, lambda t: (t.learning_rate, t.val_loss))
    figure.update_xaxes(title_text="learning rate", type="log")
    figure.update_yaxes(title_text="validation loss")
    return _plotly_layout(figure, "Validation loss vs learning rate")


def _plotly_star(figure, data: StudyPlotData, where, **position) -> None:
    import plotly.graph_objects as go

    trial = data.recommended_trial
    if trial is None:
        return
    x, y = where(trial)
    figure.add_trace(go.Scatter(
        x=[x], y=[y], mode="markers", marker=dict(symbol="star", size=18, color=_RECOMMENDED_COLOR, line=dict(width=1)),
        name="recommended", text=[_hover(trial)], hoverinfo="text",
    ), **position)


def _plotly_line(xs, ys, name: str, color: str = "black", dash: str = "dot"):
    # A trace, not a shape: plotly places shape annotations on log axes in log units.
    import plotly.graph_objects as go

    return go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, dash=dash, width=1.5), name=name, hoverinfo="name")


def _plotly_layout(figure, title: str):
    # No template: the default one adds ~8 KB of JSON to every graph, stored in the study.
    figure.update_layout(template="none", title=dict(text=title, y=0.98), legend=dict(orientation="h", y=-0.25),
                         margin=dict(t=80, b=40))
    return figure


def _hover(trial: TrialPoint) -> str:
    text = f"trial #{trial.number}<br>micro-batch {trial.micro_batch_size} × {trial.accumulation_steps}<br>lr {trial.learning_rate:.3g}"
    if trial.throughput is not None:
        text += f"<br>{trial.throughput:.1f} samples/s"
    if trial.val_loss is not None:
        text += f"<br>loss {trial.val_loss:.4f}"
    if trial.peak_memory_bytes:
        text += f"<br>peak {format_bytes(trial.peak_memory_bytes)}"
    if trial.kind != "feasible":
        text += f"<br>{INFEASIBLE_KINDS[trial.kind]}"
    return text


# --- reading trials ---------------------------------------------------------------------------


def trial_points(study, front: "set[int] | frozenset[int]" = frozenset()) -> list[TrialPoint]:
    """Every finished trial of ``study`` that drew a config; ``front`` holds the Pareto trials' numbers."""
    points = (_trial_point(trial, front) for trial in study.get_trials(deepcopy=False))
    return [point for point in points if point is not None]


def _trial_point(trial, front) -> TrialPoint | None:
    """``trial`` as a plot point; None for a trial that never drew its config (or still runs)."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state not in (TrialState.COMPLETE, TrialState.FAIL) or "micro_batch_size" not in attrs:
        return None
    kind = _kind(trial)
    feasible = kind == "feasible"
    # Whatever the study's objective, the views plot what the trial measured.
    throughput, val_loss = measured(trial) if feasible else (attrs.get("samples_per_second"), None)
    return TrialPoint(
        number=trial.number,
        micro_batch_size=int(attrs["micro_batch_size"]),
        accumulation_steps=int(attrs.get("accumulation_steps", 1)),
        effective_batch_size=int(attrs.get("effective_batch_size", attrs["micro_batch_size"])),
        learning_rate=float(attrs.get("learning_rate", math.nan)),
        kind=kind,
        throughput=float(throughput) if throughput is not None else None,
        val_loss=val_loss,
        peak_memory_bytes=attrs.get("peak_memory_bytes"),
        predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
        on_front=feasible and trial.number in front,
    )


def _kind(trial) -> str:
    """"feasible", or which kind of infeasible (the same test as the study's own recommendation)."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.FAIL:
        return "failed"
    if attrs.get("skipped_by_model"):
        return "skipped"
    if attrs.get("oom"):
        return "oom"
    if not attrs.get("feasible"):
        return "over_budget"
    if attrs.get("diverged") or trial.values is None:
        return "diverged"
    return "feasible"

