"""The four views of a study as plotly Figures, kept in the study as optuna-dashboard graphs.

:func:`save_dashboard_plots_quietly` is what the study loop calls after trials: a plot is
decoration and must never stop a study, and redrawing is throttled to a small share of its time.
"""

from __future__ import annotations

import math
import time
import warnings

from autobatch.core.memory import format_bytes
from autobatch.report.plot_data import (
    DOMINATED_COLOR,
    FRONT_COLOR,
    INFEASIBLE_COLOR,
    INFEASIBLE_KINDS,
    MODEL_COLOR,
    RECOMMENDED_COLOR,
    SHORT_KINDS,
    VIEWS,
    StudyPlotData,
    TrialPoint,
    spread,
)

#: the most of a study's time that redrawing its dashboard plots after trials may take
PLOT_TIME_SHARE = 0.05
#: ids of the graphs saved into the study (optuna-dashboard overwrites a graph with the same id)
DASHBOARD_GRAPH_IDS = {view: f"autobatch-{view.replace('_', '-')}" for view in VIEWS}

# (storage, study id) -> (monotonic time of the last redraw, seconds it took), for the throttle
_last_redraw: dict[tuple[int, int], tuple[float, float]] = {}
_PLOTLY_MARKERS = {
    "oom": "x",
    "skipped": "square-open",
    "over_budget": "diamond",
    "diverged": "triangle-up",
    "failed": "triangle-down",
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
        rows=1,
        cols=2,
        column_widths=[0.75, 0.25],
        horizontal_spacing=0.1,
        subplot_titles=("feasible trials", f"infeasible, excluded ({len(data.infeasible)})"),
    )
    front = data.front
    dominated = data.dominated
    figure.add_trace(
        go.Scatter(
            x=[t.throughput for t in dominated],
            y=[t.val_loss for t in dominated],
            mode="markers",
            marker=dict(color=DOMINATED_COLOR, size=8),
            name=f"feasible, dominated ({len(dominated)})",
            text=[_hover(t) for t in dominated],
            hoverinfo="text",
        ),
        row=1,
        col=1,
    )
    figure.add_trace(
        go.Scatter(
            x=[t.throughput for t in front],
            y=[t.val_loss for t in front],
            mode="lines+markers",
            line_shape="vh",
            marker=dict(color=FRONT_COLOR, size=9),
            name=f"feasible Pareto front ({len(front)})",
            text=[_hover(t) for t in front],
            hoverinfo="text",
        ),
        row=1,
        col=1,
    )
    _plotly_star(figure, data, lambda t: (t.throughput, t.val_loss), row=1, col=1)
    by_kind = data.infeasible_by_kind
    kinds = list(by_kind)
    for column, (kind, trials) in enumerate(by_kind.items()):
        figure.add_trace(
            go.Scatter(
                x=[column + offset for offset in spread(len(trials))],
                y=[t.micro_batch_size for t in trials],
                mode="markers",
                marker=dict(color=INFEASIBLE_COLOR, size=10, symbol=_PLOTLY_MARKERS[kind]),
                name=f"{INFEASIBLE_KINDS[kind]} ({len(trials)})",
                text=[_hover(t) for t in trials],
                hoverinfo="text",
            ),
            row=1,
            col=2,
        )
    if data.max_micro_batch and kinds:
        figure.add_trace(
            _plotly_line(
                [-0.5, len(kinds) - 0.5], [data.max_micro_batch] * 2, f"memory wall (probe): {data.max_micro_batch}"
            ),
            row=1,
            col=2,
        )
    figure.update_xaxes(
        tickvals=list(range(len(kinds))),
        ticktext=[SHORT_KINDS[k] for k in kinds],
        range=[-0.6, max(len(kinds), 1) - 0.4],
        zeroline=False,
        row=1,
        col=2,
    )
    figure.update_xaxes(title_text="throughput (samples/s)", row=1, col=1)
    figure.update_yaxes(title_text="validation loss", row=1, col=1)
    figure.update_yaxes(title_text="micro-batch size", type="log", row=1, col=2)
    return _plotly_layout(figure, "Pareto front (infeasible trials apart)")


def plotly_throughput(data: StudyPlotData):
    import plotly.graph_objects as go

    figure = go.Figure()
    measured = data.measured
    for accumulation in sorted({t.accumulation_steps for t in measured}):
        trials = sorted((t for t in measured if t.accumulation_steps == accumulation), key=lambda t: t.micro_batch_size)
        figure.add_trace(
            go.Scatter(
                x=[t.micro_batch_size for t in trials],
                y=[t.throughput for t in trials],
                mode="lines+markers",
                name=f"accumulation {accumulation}",
                text=[_hover(t) for t in trials],
                hoverinfo="text",
            )
        )
    _plotly_star(figure, data, lambda t: (t.micro_batch_size, t.throughput))
    if measured and data.max_micro_batch:
        top = max(t.throughput or 0.0 for t in measured)
        figure.add_trace(
            _plotly_line([data.max_micro_batch] * 2, [0, top], f"memory wall (probe): {data.max_micro_batch}")
        )
    figure.update_xaxes(title_text="micro-batch size (samples)", type="log")
    figure.update_yaxes(title_text="throughput (samples/s)", rangemode="tozero")
    return _plotly_layout(figure, "Throughput vs micro-batch size")


def plotly_memory(data: StudyPlotData):
    import plotly.graph_objects as go

    mib = 1024**2
    figure = go.Figure()
    right = data.micro_batch_axis_end
    model_line = data.predicted_peaks([0, right])
    if model_line is not None:
        figure.add_trace(
            go.Scatter(
                x=[0, right],
                y=[peak / mib for peak in model_line],
                mode="lines",
                line=dict(color=MODEL_COLOR),
                name="probe's fitted model",
            )
        )
    fitted = [p for p in data.probes if p.get("status") == "ok" and p.get("peak_memory_bytes")]
    figure.add_trace(
        go.Scatter(
            x=[p["micro_batch"] for p in fitted],
            y=[p["peak_memory_bytes"] / mib for p in fitted],
            mode="markers",
            marker=dict(symbol="square-open", color="black", size=10),
            name=f"probe runs ({len(fitted)})",
        )
    )
    ran = [t for t in data.trials if t.peak_memory_bytes and t.kind in ("feasible", "diverged")]
    figure.add_trace(
        go.Scatter(
            x=[t.micro_batch_size for t in ran],
            y=[(t.peak_memory_bytes or 0) / mib for t in ran],
            mode="markers",
            marker=dict(color=FRONT_COLOR, size=7),
            name=f"search trials ({len(ran)})",
            text=[_hover(t) for t in ran],
            hoverinfo="text",
        )
    )
    stopped = data.stopped
    if stopped:
        figure.add_trace(
            go.Scatter(
                x=[t.micro_batch_size for t in stopped],
                y=[(t.peak_memory_bytes or t.predicted_peak_bytes or data.memory_budget_bytes) / mib for t in stopped],
                mode="markers",
                marker=dict(color=INFEASIBLE_COLOR, size=10, symbol="x"),
                name=f"out of memory or skipped ({len(stopped)})",
                text=[_hover(t) for t in stopped],
                hoverinfo="text",
            )
        )
    if data.memory_budget_bytes:
        budget = data.memory_budget_bytes / mib
        figure.add_trace(
            _plotly_line(
                [0, right],
                [budget, budget],
                f"memory budget {format_bytes(data.memory_budget_bytes)}",
                color=INFEASIBLE_COLOR,
                dash="solid",
            )
        )
    if data.max_micro_batch:
        figure.add_trace(
            _plotly_line(
                [data.max_micro_batch] * 2,
                [0, data.memory_budget_bytes / mib],
                f"memory wall (probe): {data.max_micro_batch}",
            )
        )
    figure.update_xaxes(title_text="micro-batch size (samples)", range=[0, right])
    figure.update_yaxes(title_text="peak memory (MiB)", rangemode="tozero")
    return _plotly_layout(figure, "Peak memory vs micro-batch size")


def plotly_learning_rate(data: StudyPlotData):
    import plotly.graph_objects as go

    figure = go.Figure()
    feasible = data.feasible
    figure.add_trace(
        go.Scatter(
            x=[t.learning_rate for t in feasible],
            y=[t.val_loss for t in feasible],
            mode="markers",
            marker=dict(
                size=9,
                color=[math.log2(t.effective_batch_size) for t in feasible],
                colorscale="Viridis",
                showscale=bool(feasible),
                colorbar=dict(title="log2 effective batch"),
            ),
            name=f"feasible trials ({len(feasible)})",
            text=[_hover(t) for t in feasible],
            hoverinfo="text",
        )
    )
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
    figure.add_trace(
        go.Scatter(
            x=[x],
            y=[y],
            mode="markers",
            marker=dict(symbol="star", size=18, color=RECOMMENDED_COLOR, line=dict(width=1)),
            name="recommended",
            text=[_hover(trial)],
            hoverinfo="text",
        ),
        **position,
    )


def _plotly_line(xs, ys, name: str, color: str = "black", dash: str = "dot"):
    # A trace, not a shape: plotly places shape annotations on log axes in log units.
    import plotly.graph_objects as go

    return go.Scatter(
        x=xs, y=ys, mode="lines", line=dict(color=color, dash=dash, width=1.5), name=name, hoverinfo="name"
    )


def _plotly_layout(figure, title: str):
    # No template: the default one adds ~8 KB of JSON to every graph, stored in the study.
    figure.update_layout(
        template="none", title=dict(text=title, y=0.98), legend=dict(orientation="h", y=-0.25), margin=dict(t=80, b=40)
    )
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
