"""Text a person reads: the study note in optuna-dashboard and the CLI's tables.

:func:`write_note` keeps the note and the dashboard's plots current; the result it
writes comes from :func:`autobatch.search.results.summarize`, which knows nothing of notes.
"""

from __future__ import annotations

import importlib.util

from autobatch.core.memory import budget_coverage, format_bytes
from autobatch.search.fidelity import MIN_RUN_STEPS


def write_note(study, result, *, during_search: bool = False) -> None:
    """Keep the study's note and plots in optuna-dashboard current (when optuna-dashboard is installed).

    ``result`` is the study's :class:`~autobatch.search.results.TuneResult`. ``during_search``:
    after a trial, when redrawing the plots may wait a little (see report/dashboard_plots.py).
    """
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    from autobatch.report.dashboard_plots import save_dashboard_plots_quietly

    save_note(study, study_note(study, result))
    save_dashboard_plots_quietly(study, result, throttle=during_search)


def study_note(study, result) -> str:
    """Markdown for the study's note: the recommendation, the wall, the feasible Pareto front."""
    from autobatch.search.objectives import get_objective

    settings = study.user_attrs.get("autobatch", {})
    objective = get_objective(getattr(result, "objective", None) or settings.get("objective", "pareto"))
    lines = [
        f"# autobatch: {settings.get('task', '?')} on {settings.get('backend', '?')} ({settings.get('device', '?')})",
        "",
    ]
    lines += [f"Objective: **{objective.name}** ({objective_text(objective.name, settings)}).", ""]
    horizon = horizon_lines(result)
    if horizon:
        lines += ["## Horizon", "", *horizon, ""]
    rec = result.recommended
    if rec:
        lines += [
            "## Recommended config",
            "",
            f"**micro-batch {rec['micro_batch_size']} × accumulation {rec['accumulation_steps']} "
            f"(effective batch {rec['effective_batch_size']}), learning rate {rec['learning_rate']:.3g}**",
            "",
            f"{rec['throughput']:.1f} samples/s{_goodput_text(rec)}, validation loss {rec['val_loss']:.4f}"
            f"{_within_text(objective.name, settings)}, peak memory {format_bytes(rec['peak_memory_bytes'])} "
            f"(trial #{rec['trial_number']}).",
            "",
            objective.rule_text(settings.get("loss_tolerance", 0.02)),
            "",
        ]
    else:
        lines += ["No feasible trial yet: no recommendation.", ""]
    tips = telemetry_advice(rec, settings)
    if tips:
        lines += ["## Advice from telemetry", "", *[f"- {tip}" for tip in tips], ""]
    lines += noise_section(getattr(result, "noise_scale", None), settings, rec)
    probe = result.probe or {}
    model = probe.get("memory_model", {})
    lines += [
        "## Memory wall",
        "",
        f"Budget {_budget_text(result.memory_budget_bytes, settings.get('memory_budget'))}, "
        f"safety margin {settings.get('safety_margin', 0.05):.0%}: the largest micro-batch that fits is "
        f"**{result.max_micro_batch}** (probe: {len(probe.get('probes', []))} short runs in "
        f"{probe.get('seconds', 0):.1f} s; peak ≈ {format_bytes(model.get('intercept_bytes'))} + "
        f"{format_bytes(model.get('bytes_per_sample'))} per sample).",
        "",
        *_worst_case_lines(probe),
        f"On {settings.get('device', '?')} the budget covers "
        f"{budget_coverage(settings.get('backend'), settings.get('device', 'cpu'))}.",
        "",
        "## Feasible Pareto front",
        "",
        "Infeasible trials (out of memory, over the budget, skipped by the memory model, diverged) "
        "are excluded here, whatever the dashboard's own Pareto plot shows.",
        "",
        pareto_table(result.pareto_front),
        "",
        f"{result.n_trials} trials, {result.n_oom_trials} out of memory, {result.n_failed_trials} failed"
        f"{_pruned_text(result)}.",
        "",
        _excluded_text(study),
    ]
    if importlib.util.find_spec("plotly") is not None:  # the plots are saved into the study only with plotly
        lines += [
            "",
            "Plots: autobatch's own Pareto front (infeasible trials drawn apart), throughput and peak memory vs "
            "micro-batch, and validation loss vs learning rate are on the study's main page, below the "
            "dashboard's plots; `autobatch report` writes them as PNG files.",
        ]
    if result.costs:
        costs = ", ".join(
            f"{k.removeprefix('mean_').removesuffix('_seconds')} {v:.2f} s" for k, v in result.costs.items()
        )
        lines += ["", f"Mean per-trial cost: {costs}."]
    return "\n".join(lines) + "\n"


def horizon_lines(result) -> list[str]:
    """What run the recommendation is for, how far trials trained toward it, and how its loss there is known."""
    horizon = getattr(result, "horizon", None)
    if not horizon:
        return []
    given = "" if horizon.get("given") else " (the default, one epoch of the task's training split: give --horizon)"
    share = horizon["top_share"]
    lines = [f"Recommended for a run of {horizon['horizon']}{given}."]
    if share >= 0.999:
        lines.append("The longest trials trained the whole horizon.")
    else:
        lines.append(
            f"The longest trials trained {share:.0%} of it ({horizon.get('reason')}); the loss at the horizon is "
            "predicted from each trial's learning curve, L(n) = L_inf + b·n^-c."
        )
    largest = horizon.get("max_effective_batch")
    if largest is not None and horizon.get("max_effective_batch_given"):
        lines.append(f"Effective batches were searched up to {largest} (max_effective_batch).")
    elif largest is not None:
        lines.append(
            f"Effective batches were searched up to {largest}, so that the run takes at least {MIN_RUN_STEPS} "
            "optimizer steps."
        )
    rec = result.recommended
    if rec and rec.get("loss_at_horizon") is not None:
        lines.append(f"The recommended trial trained {rec.get('horizon_share', 0):.0%} of it: {_at_horizon(rec)}.")
    if horizon.get("warning"):
        lines.append(f"Warning: {horizon['warning']}.")
    return lines


def _at_horizon(trial: dict) -> str:
    """A trial's loss at the horizon, and how it is known."""
    loss, kind = trial["loss_at_horizon"], trial.get("loss_at_horizon_kind", "measured")
    if kind == "predicted":
        return f"loss at the horizon {loss:.4f} ± {trial['horizon_prediction']['spread']:.4f} (predicted)"
    return f"loss at the horizon {loss:.4f} ({kind})"


def objective_text(name: str, settings: dict) -> str:
    """One line on what the study optimizes."""
    if name == "goodput":
        return (
            "throughput × statistical efficiency from the gradient noise scale; learning rate by the "
            f"{settings.get('lr_rule', '?')} rule"
        )
    if name == "time-to-target":
        budget = settings.get("trial_budget", {})
        return (
            f"validation loss after {budget.get('train_seconds', '?')} s of training per trial, measured "
            f"{budget.get('evaluations', '?')} times; {settings.get('pruner', '?')} pruning"
        )
    if name == "horizon":
        return f"validation loss at the horizon; {settings.get('pruner', '?')} pruning toward it"
    return "throughput and validation loss"


def noise_section(noise: dict | None, settings: dict, recommended: dict | None) -> list[str]:
    """The study note's lines on the gradient noise scale (none when nothing measured it)."""
    if not noise:
        return []
    from autobatch.core.noise import statistical_efficiency

    estimate = noise.get("b_simple")
    lines = ["## Gradient noise scale", ""]
    if estimate is None:
        lines.append(
            "Estimated critical batch size: **beyond what the measured batches resolve** (the gradient is "
            "small next to its noise): larger batches still pay off."
        )
    else:
        spread = noise.get("per_trial_range")
        spread_text = f", per-trial estimates {spread[0]:.0f}–{spread[1]:.0f}" if spread else ""
        lines.append(
            f"Estimated critical batch size B_simple ≈ **{estimate:.0f}** samples (pooled over {noise['trials']} "
            f"measurements, {noise['windows']} windows{spread_text}). Past it, a larger effective batch no "
            "longer cuts the steps a run needs in proportion: it mostly buys throughput."
        )
    if recommended and estimate is not None:
        base = settings.get("base_batch_size") or 1
        efficiency = statistical_efficiency(estimate, recommended["effective_batch_size"], base)
        lines.append(
            f"At the recommended effective batch {recommended['effective_batch_size']} the statistical efficiency "
            f"against the base batch {base} is {efficiency:.0%}."
        )
    if "probe" in noise:
        probe = noise["probe"]
        used = f"{probe:.0f}" if probe is not None else "unbounded"
        lines.append(
            f"Goodput and the adascale rule use the noise probe's B_noise = {used}, measured once at the start."
        )
    return lines + [""]


def _goodput_text(recommended: dict) -> str:
    if "goodput" not in recommended:
        return ""
    return f" (goodput {recommended['goodput']:.1f}, efficiency {recommended['statistical_efficiency']:.0%})"


def _within_text(objective: str, settings: dict) -> str:
    if objective != "time-to-target":
        return ""
    return f" within {settings.get('trial_budget', {}).get('train_seconds', '?')} s of training"


def _pruned_text(result) -> str:
    pruned = getattr(result, "n_pruned_trials", 0)
    return f", {pruned} pruned" if pruned else ""


def _budget_text(budget_bytes: int, as_given: str | None) -> str:
    shown = format_bytes(budget_bytes)
    return shown if not as_given or as_given == shown else f"{shown} ({as_given})"


def _excluded_text(study) -> str:
    """Which trials the front leaves out, and why (the dashboard's own Pareto plot shows them)."""
    from autobatch.report.plot_data import INFEASIBLE_KINDS, trial_points

    excluded = [t for t in trial_points(study) if t.kind != "feasible"]
    by_kind = {kind: [f"#{t.number}" for t in excluded if t.kind == kind] for kind in INFEASIBLE_KINDS}
    parts = [f"{INFEASIBLE_KINDS[kind]}: {', '.join(numbers)}" for kind, numbers in by_kind.items() if numbers]
    return "Excluded trials: " + ("; ".join(parts) if parts else "none") + "."


def pareto_table(front: list[dict]) -> str:
    """The front as a markdown table; with the horizon's columns where trials measured toward one."""
    toward_horizon = any(p.get("loss_at_horizon") is not None for p in front)
    header = "| trial | micro-batch | accumulation | effective | learning rate | samples/s | val loss | peak memory |"
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if toward_horizon:
        header += " trained | loss at horizon |"
        rule += "---:|---|"
    rows = []
    for p in front:
        row = (
            f"| {p['trial_number']} | {p['micro_batch_size']} | {p['accumulation_steps']} | {p['effective_batch_size']} "
            f"| {p['learning_rate']:.3g} | {p['throughput']:.1f} | {p['val_loss']:.4f} "
            f"| {format_bytes(p['peak_memory_bytes'])} |"
        )
        if toward_horizon:
            trained = p.get("horizon_share")
            loss = _at_horizon(p).removeprefix("loss at the horizon ") if p.get("loss_at_horizon") is not None else "-"
            row += f" {'-' if trained is None else format(trained, '.0%')} | {loss} |"
        rows.append(row)
    return "\n".join([header, rule, *rows]) if rows else "(empty)"


def summary_text(result) -> str:
    """The CLI's closing summary of a study."""
    settings = getattr(getattr(result, "study", None), "user_attrs", {}).get("autobatch", {})
    objective = getattr(result, "objective", "pareto")
    lines = [
        f"study {result.study_name!r} in {result.storage}",
        f"objective: {objective} ({objective_text(objective, settings)})",
        *horizon_lines(result),
        f"memory budget {format_bytes(result.memory_budget_bytes)}; largest micro-batch that fits: "
        f"{result.max_micro_batch}{_worst_case_text(result)}",
        f"{result.n_trials} trials, {result.n_oom_trials} out of memory, {result.n_failed_trials} failed{_pruned_text(result)}",
        "",
        "Feasible Pareto front:",
        pareto_table(result.pareto_front),
        "",
    ]
    rec = result.recommended
    if rec:
        lines.append(
            f"Recommended: micro-batch {rec['micro_batch_size']} x accumulation {rec['accumulation_steps']} "
            f"(effective batch {rec['effective_batch_size']}), learning rate {rec['learning_rate']:.3g} "
            f"-> {rec['throughput']:.1f} samples/s{_goodput_text(rec)}, validation loss {rec['val_loss']:.4f}"
            f"{_within_text(objective, settings)}, peak memory {format_bytes(rec['peak_memory_bytes'])}"
        )
    else:
        lines.append("No feasible trial: no recommendation.")
    noise = getattr(result, "noise_scale", None)
    if noise:
        estimate = noise.get("b_simple")
        lines.append(
            "Critical batch size (gradient noise scale): "
            + (f"~{estimate:.0f} samples" if estimate is not None else "beyond what the measured batches resolve")
        )
    lines += [f"Advice: {tip}" for tip in telemetry_advice(rec, settings)]
    return "\n".join(lines)


def telemetry_advice(recommended: dict | None, settings: dict) -> list[str]:
    """What the recommended trial's telemetry says to try next (see :func:`autobatch.process.telemetry.advice`)."""
    if not recommended:
        return []
    from autobatch.process.telemetry import advice

    trial_budget = settings.get("trial_budget", {})
    return advice(
        recommended.get("telemetry"),
        device=settings.get("device"),
        backend=settings.get("backend"),
        num_workers=trial_budget.get("num_workers", 0),
        mixed_precision=trial_budget.get("mixed_precision", False),
    )


def _worst_case_lines(probe: dict) -> list[str]:
    """Where memory depends on the sample: which size the wall holds for."""
    size = probe.get("worst_case_sample_size")
    if size is None:
        return []
    return [
        f"The task's samples differ in size: every probe and trial trained its first windows on the longest "
        f"samples (size {size}), so the wall holds for the worst batch of an epoch, not just a random one.",
        "",
    ]


def _worst_case_text(result) -> str:
    size = (getattr(result, "probe", None) or {}).get("worst_case_sample_size")
    return "" if size is None else f" (measured on windows of the longest samples, size {size})"
