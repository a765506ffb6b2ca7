"""The four views of a study as matplotlib Figures, for the PNG report (``autobatch report``).

Drawn from a :class:`~autobatch.report.plot_data.StudyPlotData`; no pyplot, so nothing global is
touched and no display is needed.
"""

from __future__ import annotations

import math

from autobatch.core.memory import format_bytes
from autobatch.report.plot_data import (
    DOMINATED_COLOR,
    FRONT_COLOR,
    INFEASIBLE_COLOR,
    INFEASIBLE_KINDS,
    MODEL_COLOR,
    RECOMMENDED_COLOR,
    SHORT_KINDS,
    StudyPlotData,
    TrialPoint,
    spread,
)

_MARKERS = {"oom": "X", "skipped": "s", "over_budget": "D", "diverged": "^", "failed": "v"}


def matplotlib_figures(data: StudyPlotData) -> dict:
    """The four views as matplotlib Figures, by view name (:data:`~autobatch.report.plot_data.VIEWS`)."""
    return {
        "pareto": pareto_figure(data),
        "throughput": throughput_figure(data),
        "memory": memory_figure(data),
        "learning_rate": learning_rate_figure(data),
    }


def pareto_figure(data: StudyPlotData):
    """Feasible trials with their Pareto front and the recommendation; infeasible ones in a panel apart."""
    figure = _figure(12.0, 6.0)
    grid = figure.add_gridspec(1, 2, width_ratios=(3.2, 1.0))
    axes = figure.add_subplot(grid[0])
    side = figure.add_subplot(grid[1])
    figure.suptitle(f"Pareto front: throughput vs validation loss\n{_wrapped(data.title, 110)}", fontsize=12)

    front = data.front
    dominated = data.dominated
    if dominated:
        axes.scatter(
            [t.throughput for t in dominated],
            [t.val_loss for t in dominated],
            s=36,
            color=DOMINATED_COLOR,
            alpha=0.8,
            label=f"feasible, dominated ({len(dominated)})",
            zorder=2,
        )
    if front:
        axes.plot(
            [t.throughput for t in front],
            [t.val_loss for t in front],
            "-o",
            color=FRONT_COLOR,
            markersize=7,
            drawstyle="steps-pre",
            label=f"feasible Pareto front ({len(front)})",
            zorder=3,
        )
        for t in front:
            axes.annotate(
                f"#{t.number}", (t.throughput, t.val_loss), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
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
    by_kind = data.infeasible_by_kind
    kinds = list(by_kind)
    total = len(data.infeasible)
    axes.set_title(f"infeasible trials, excluded ({total})", fontsize=11)
    if data.max_micro_batch:
        axes.axhline(
            data.max_micro_batch,
            color="black",
            linestyle=":",
            linewidth=1.2,
            label=f"memory wall (probe): {data.max_micro_batch}",
        )
    for column, (kind, trials) in enumerate(by_kind.items()):
        axes.scatter(
            [column + offset for offset in spread(len(trials))],
            [t.micro_batch_size for t in trials],
            marker=_MARKERS[kind],
            s=60,
            color=INFEASIBLE_COLOR,
            alpha=0.85,
            label=f"{INFEASIBLE_KINDS[kind]} ({len(trials)})",
            gid=f"infeasible:{kind}",
            zorder=3,
        )
    axes.set_xticks(range(len(kinds)), [SHORT_KINDS[k] for k in kinds], fontsize=9)
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
    figure, axes = _titled_axes("Throughput vs micro-batch size", data)
    measured = data.measured
    for accumulation in sorted({t.accumulation_steps for t in measured}):
        by_micro: dict[int, list[float]] = {}
        for t in measured:
            if t.accumulation_steps == accumulation:
                by_micro.setdefault(t.micro_batch_size, []).append(t.throughput or 0.0)
        micro = sorted(by_micro)
        axes.plot(
            micro,
            [sum(by_micro[m]) / len(by_micro[m]) for m in micro],
            "-o",
            markersize=5,
            label=f"accumulation {accumulation}",
        )
    stopped = data.stopped
    if stopped:
        axes.scatter(
            [t.micro_batch_size for t in stopped],
            [0] * len(stopped),
            marker="x",
            color=INFEASIBLE_COLOR,
            s=50,
            clip_on=False,
            zorder=4,
            label=f"out of memory or skipped, no throughput ({len(stopped)})",
        )
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
    figure, axes = _titled_axes("Peak memory vs micro-batch size", data)
    unit_name, unit = ("GiB", 1024**3) if data.memory_budget_bytes >= 4 * 1024**3 else ("MiB", 1024**2)
    right = data.micro_batch_axis_end

    model_line = data.predicted_peaks([0, right])
    if model_line is not None:
        axes.plot(
            [0, right],
            [peak / unit for peak in model_line],
            color=MODEL_COLOR,
            linewidth=1.5,
            label=f"fitted model: {format_bytes(data.intercept_bytes)} + {format_bytes(data.bytes_per_sample)} × micro-batch",
        )
    fitted = [p for p in data.probes if p.get("status") == "ok" and p.get("peak_memory_bytes")]
    if fitted:
        axes.scatter(
            [p["micro_batch"] for p in fitted],
            [p["peak_memory_bytes"] / unit for p in fitted],
            marker="s",
            s=50,
            facecolor="none",
            edgecolor="black",
            linewidth=1.5,
            zorder=4,
            label=f"probe runs ({len(fitted)})",
        )
    probe_ooms = [p for p in data.probes if p.get("status") == "oom"]
    ran = [t for t in data.trials if t.peak_memory_bytes and t.kind in ("feasible", "diverged")]
    if ran:
        axes.scatter(
            [t.micro_batch_size for t in ran],
            [(t.peak_memory_bytes or 0) / unit for t in ran],
            s=30,
            color=FRONT_COLOR,
            alpha=0.8,
            zorder=3,
            label=f"search trials ({len(ran)})",
        )
    ooms = [t for t in data.trials if t.kind in ("oom", "over_budget")]
    cap = data.memory_budget_bytes / unit
    if ooms or probe_ooms:
        xs = [t.micro_batch_size for t in ooms] + [p["micro_batch"] for p in probe_ooms]
        ys = [(t.peak_memory_bytes / unit if t.peak_memory_bytes else cap) for t in ooms] + [
            (p["peak_memory_bytes"] / unit if p.get("peak_memory_bytes") else cap) for p in probe_ooms
        ]
        axes.scatter(
            xs,
            ys,
            marker="X",
            s=60,
            color=INFEASIBLE_COLOR,
            zorder=4,
            label=f"out of memory (trials {len(ooms)}, probes {len(probe_ooms)})",
        )
    skipped = [t for t in data.trials if t.kind == "skipped" and t.predicted_peak_bytes]
    if skipped:
        axes.scatter(
            [t.micro_batch_size for t in skipped],
            [(t.predicted_peak_bytes or 0) / unit for t in skipped],
            marker="s",
            s=40,
            facecolor="none",
            edgecolor=INFEASIBLE_COLOR,
            zorder=3,
            label=f"skipped, at their predicted peak ({len(skipped)})",
        )
    if data.memory_budget_bytes:
        axes.axhline(
            cap, color=INFEASIBLE_COLOR, linewidth=1.5, label=f"memory budget {format_bytes(data.memory_budget_bytes)}"
        )
        if data.safety_margin:
            axes.axhline(
                cap * (1 - data.safety_margin),
                color="#ff7f0e",
                linestyle="--",
                linewidth=1.2,
                label=f"probe limit (budget less {data.safety_margin:.0%} margin)",
            )
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

    figure, axes = _titled_axes("Validation loss vs learning rate", data)
    feasible = data.feasible
    if feasible:
        batches = [t.effective_batch_size for t in feasible]
        low, high = float(min(batches)), float(max(max(batches), min(batches) + 1))
        norm = LogNorm(vmin=low, vmax=high)
        points = axes.scatter(
            [t.learning_rate for t in feasible],
            [t.val_loss for t in feasible],
            c=batches,
            cmap="viridis",
            norm=norm,
            s=40,
            edgecolor="black",
            linewidth=0.4,
            zorder=3,
            label=f"feasible trials ({len(feasible)})",
        )
        colorbar = figure.colorbar(points, ax=axes, label="effective batch size (samples)")
        powers = range(int(math.log2(low)), int(math.ceil(math.log2(high))) + 1)
        colorbar.set_ticks([2**k for k in powers if low <= 2**k <= high] or [low, high])
        colorbar.ax.yaxis.set_major_formatter(_plain_number_formatter())
        colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        axes.text(0.5, 0.5, "no feasible trial yet", transform=axes.transAxes, ha="center", va="center", color="gray")
    diverged = [t for t in data.trials if t.kind == "diverged"]
    if diverged:
        # No finite loss to plot: mark them on the top edge, at their learning rate.
        axes.scatter(
            [t.learning_rate for t in diverged],
            [1.0] * len(diverged),
            marker="^",
            s=60,
            color=INFEASIBLE_COLOR,
            transform=axes.get_xaxis_transform(),
            clip_on=False,
            zorder=4,
            label=f"diverged, loss not finite ({len(diverged)})",
        )
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


def _figure(width: float = 9.0, height: float = 5.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _titled_axes(main: str, data: StudyPlotData):
    """A one-panel figure and its axes, titled ``main`` over the study's task, backend and device."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.set_title(f"{main}\n{_wrapped(data.title, 80)}", fontsize=12)
    return figure, axes


def _wrapped(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def _star(axes, data: StudyPlotData, where) -> None:
    trial = data.recommended_trial
    if trial is None:
        return
    x, y = where(trial)
    axes.scatter(
        [x],
        [y],
        marker="*",
        s=320,
        color=RECOMMENDED_COLOR,
        edgecolor="black",
        linewidth=1.0,
        zorder=5,
        label=f"recommended: {_config_text(trial)}",
    )


def _wall_line(axes, data: StudyPlotData) -> None:
    if data.max_micro_batch:
        axes.axvline(
            data.max_micro_batch,
            color="black",
            linestyle=":",
            linewidth=1.2,
            label=f"memory wall (probe): micro-batch {data.max_micro_batch}",
        )


def _config_text(trial: TrialPoint) -> str:
    return (
        f"#{trial.number}, micro-batch {trial.micro_batch_size} × accumulation {trial.accumulation_steps}, "
        f"lr {trial.learning_rate:.3g}"
    )


def _plain_number_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")
