"""Text a person reads: the study note in optuna-dashboard and the CLI's tables."""

from __future__ import annotations

import importlib.util

from autobatch.memory import format_bytes


def study_note(study, result) -> str:
    """Markdown for the study's note: the recommendation, the wall, the feasible Pareto front."""
    settings = study.user_attrs.get("autobatch", {})
    lines = [f"# autobatch: {settings.get('task', '?')} on {settings.get('backend', '?')} ({settings.get('device', '?')})", ""]
    rec = result.recommended
    if rec:
        lines += [
            "## Recommended config",
            "",
            f"**micro-batch {rec['micro_batch_size']} × accumulation {rec['accumulation_steps']} "
            f"(effective batch {rec['effective_batch_size']}), learning rate {rec['learning_rate']:.3g}**",
            "",
            f"{rec['throughput']:.1f} samples/s, validation loss {rec['val_loss']:.4f}, "
            f"peak memory {format_bytes(rec['peak_memory_bytes'])} (trial #{rec['trial_number']}).",
            "",
            f"Rule: the fastest feasible Pareto-optimal trial whose validation loss is within "
            f"{settings.get('loss_tolerance', 0.02):.0%} of the best feasible loss.",
            "",
        ]
    else:
        lines += ["No feasible trial yet: no recommendation.", ""]
    tips = telemetry_advice(rec, settings)
    if tips:
        lines += ["## Advice from telemetry", "", *[f"- {tip}" for tip in tips], ""]
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
        "## Feasible Pareto front",
        "",
        "Infeasible trials (out of memory, over the budget, skipped by the memory model, diverged) "
        "are excluded here, whatever the dashboard's own Pareto plot shows.",
        "",
        pareto_table(result.pareto_front),
        "",
        f"{result.n_trials} trials, {result.n_oom_trials} out of memory, {result.n_failed_trials} failed.",
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
        costs = ", ".join(f"{k.removeprefix('mean_').removesuffix('_seconds')} {v:.2f} s" for k, v in result.costs.items())
        lines += ["", f"Mean per-trial cost: {costs}."]
    return "\n".join(lines) + "\n"


def _budget_text(budget_bytes: int, as_given: str | None) -> str:
    shown = format_bytes(budget_bytes)
    return shown if not as_given or as_given == shown else f"{shown} ({as_given})"


def _excluded_text(study) -> str:
    """Which trials the front leaves out, and why (the dashboard's own Pareto plot shows them)."""
    from autobatch.plots import INFEASIBLE_KINDS, trial_points

    excluded = [t for t in trial_points(study) if t.kind != "feasible"]
    by_kind = {kind: [f"#{t.number}" for t in excluded if t.kind == kind] for kind in INFEASIBLE_KINDS}
    parts = [f"{INFEASIBLE_KINDS[kind]}: {', '.join(numbers)}" for kind, numbers in by_kind.items() if numbers]
    return "Excluded trials: " + ("; ".join(parts) if parts else "none") + "."


def pareto_table(front: list[dict]) -> str:
    header = "| trial | micro-batch | accumulation | effective | learning rate | samples/s | val loss | peak memory |"
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    rows = [
        f"| {p['trial_number']} | {p['micro_batch_size']} | {p['accumulation_steps']} | {p['effective_batch_size']} "
        f"| {p['learning_rate']:.3g} | {p['throughput']:.1f} | {p['val_loss']:.4f} | {format_bytes(p['peak_memory_bytes'])} |"
        for p in front
    ]
    return "\n".join([header, rule, *rows]) if rows else "(empty)"


def summary_text(result) -> str:
    """The CLI's closing summary of a study."""
    lines = [
        f"study {result.study_name!r} in {result.storage}",
        f"memory budget {format_bytes(result.memory_budget_bytes)}; largest micro-batch that fits: {result.max_micro_batch}",
        f"{result.n_trials} trials, {result.n_oom_trials} out of memory, {result.n_failed_trials} failed",
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
            f"-> {rec['throughput']:.1f} samples/s, validation loss {rec['val_loss']:.4f}, "
            f"peak memory {format_bytes(rec['peak_memory_bytes'])}"
        )
    else:
        lines.append("No feasible trial: no recommendation.")
    settings = getattr(getattr(result, "study", None), "user_attrs", {}).get("autobatch", {})
    lines += [f"Advice: {tip}" for tip in telemetry_advice(rec, settings)]
    return "\n".join(lines)


def telemetry_advice(recommended: dict | None, settings: dict) -> list[str]:
    """What the recommended trial's telemetry says to try next (see :func:`autobatch.telemetry.advice`)."""
    if not recommended:
        return []
    from autobatch.telemetry import advice

    trial_budget = settings.get("trial_budget", {})
    return advice(
        recommended.get("telemetry"),
        device=settings.get("device"),
        backend=settings.get("backend"),
        num_workers=trial_budget.get("num_workers", 0),
        mixed_precision=trial_budget.get("mixed_precision", False),
    )
