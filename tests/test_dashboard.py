"""Inspection: optuna-dashboard on a real study (in headless Chromium), the PNG report, and the command's start and stop."""

import contextlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest

from autobatch import SearchSpace, tune
from tests.conftest import ROOT, chromium_path, skip_missing

SYNTHETIC = dict(task="tests.synthetic_backend:workload", backend="tests.synthetic_backend:SyntheticBackend")
STUDY_NAME = "dashboard-study"
ARTIFACTS = ROOT / "artifacts"
MIB = 2**20
#: a micro-batch far past the synthetic backend's wall (about 108 under 256MiB)
OVER_BUDGET = 400
PLOT_TITLES = (
    "Pareto front (infeasible trials apart)",
    "Throughput vs micro-batch size",
    "Peak memory vs micro-batch size",
    "Validation loss vs learning rate",
)


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    """A real short study on the synthetic backend, with at least one infeasible trial.

    Micro-batches are searched past the wall (about 108), and the last trial is one a person
    asks for by hand (enqueued, as in the dashboard): micro-batch 400, recorded as skipped
    because the memory model puts it far over the budget.
    """
    import optuna

    path = tmp_path_factory.mktemp("dashboard") / "study.db"
    common = dict(
        **SYNTHETIC,
        memory_budget="256MiB",
        device="cpu",
        storage=f"sqlite:///{path}",
        study_name=STUDY_NAME,
        search_space=SearchSpace(max_micro_batch=400),
        seed=1,
    )
    tune(**common, n_trials=7)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{path}")
    study.enqueue_trial({"micro_batch_size": OVER_BUDGET, "accumulation_steps": 1, "lr_offset_decades": 0.0})
    result = tune(**common, n_trials=1)
    assert result.n_trials == 8 and result.recommended is not None
    return f"sqlite:///{path}", result


@pytest.mark.browser
@pytest.mark.slow
def test_dashboard_shows_the_note_and_plots_in_chromium(real_study, tmp_path):
    chromium = chromium_path()
    if chromium is None:
        skip_missing("Chromium", "install Debian's chromium (apt-get install -y chromium)")  # fails under CI
    storage, result = real_study
    port = _free_port()
    with _dashboard(storage, port, tmp_path) as process:
        studies = _wait_for_studies(port, process)
        study_id = next(s["study_id"] for s in studies if s["study_name"] == STUDY_NAME)
        base = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        ARTIFACTS.mkdir(exist_ok=True)

        note_page = _rendered_text(chromium, tmp_path, f"{base}/note", ARTIFACTS / "dashboard_note.png", "1400,1500")
        rec = result.recommended
        expected = f"micro-batch {rec['micro_batch_size']} × accumulation {rec['accumulation_steps']}"
        assert expected in note_page, f"{expected!r} not in the rendered note page: {note_page[:1500]!r}"
        for text in (
            "Recommended config",
            "Memory wall",
            f"fits is {result.max_micro_batch}",
            "Feasible Pareto front",
            "Infeasible trials",
            "are excluded",
            "Excluded trials:",
        ):
            assert text in note_page, text

        study_page = _rendered_text(chromium, tmp_path, base, ARTIFACTS / "dashboard_study.png", "1400,3000")
        for text in ("throughput (samples/s)", "validation loss", *PLOT_TITLES):
            assert text in study_page, f"{text!r} not in the rendered study page"

        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert (ARTIFACTS / "dashboard_note.png").stat().st_size > 20_000


@pytest.mark.slow
def test_dashboard_listens_on_localhost_and_stops_cleanly_on_ctrl_c(real_study, tmp_path):
    storage, _ = real_study
    port = _free_port()
    with _dashboard(storage, port, tmp_path) as process:
        first_line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard" in first_line
        assert any(s["study_name"] == STUDY_NAME for s in _wait_for_studies(port, process))
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err and err.strip() == ""
    assert "stopped" in out


@pytest.mark.parametrize("case", ["missing file", "not a database"])
def test_dashboard_on_a_bad_storage_says_so_in_one_line(run_cli, tmp_path, case):
    path = tmp_path / "study.db"
    if case == "not a database":
        path.write_text("this is not a database\n" * 100)
    completed = run_cli("dashboard", "--storage", f"sqlite:///{path}", "--port", str(_free_port()), timeout=60)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autobatch dashboard: error: storage="), completed.stderr
    assert ("does not exist" if case == "missing file" else "cannot be opened") in lines[0]
    assert path.exists() == (case == "not a database")  # a missing file is not created


@pytest.mark.slow
def test_report_writes_four_readable_pngs(real_study, run_cli, tmp_path):
    import matplotlib.image

    from autobatch.report.png_report import REPORT_FILES

    storage, _ = real_study
    out = tmp_path / "report"
    completed = run_cli("report", "--storage", storage, "--study-name", STUDY_NAME, "--out", str(out), timeout=120)
    assert completed.returncode == 0, completed.stderr
    for name in REPORT_FILES.values():
        path = out / name
        assert path.is_file() and path.stat().st_size > 20_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 400 and pixels.shape[1] > 600, name
        assert pixels[..., :3].std() > 0.05, f"{name} is close to blank"
        shutil.copy(path, _artifact_dir("report") / name)
    missing = run_cli("report", "--storage", storage, "--study-name", "no-such-study", "--out", str(out), timeout=60)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


@pytest.mark.slow
def test_pareto_plot_of_a_real_study_draws_every_infeasible_trial_apart(real_study):
    from autobatch.report.figures import pareto_figure
    from autobatch.report.plot_data import StudyPlotData

    _, result = real_study
    data = StudyPlotData.from_study(result.study)
    infeasible = [t for t in result.study.trials if not t.user_attrs.get("feasible") or t.user_attrs.get("diverged")]
    enqueued = [t for t in infeasible if t.user_attrs["micro_batch_size"] == OVER_BUDGET]
    assert enqueued and enqueued[0].user_attrs["skipped_by_model"] and enqueued[0].constraints["memory"] > 0
    main, side = pareto_figure(data).axes[:2]
    drawn = {c.get_gid(): sorted(y for _, y in c.get_offsets()) for c in _infeasible_collections(side)}
    assert sum(len(ys) for ys in drawn.values()) == len(infeasible)
    assert OVER_BUDGET in drawn["infeasible:skipped"]  # the side panel plots the micro-batch
    assert not _infeasible_collections(main)


def test_pareto_plot_draws_infeasible_trials_apart_by_kind():
    from autobatch.report.figures import pareto_figure
    from autobatch.report.plot_data import StudyPlotData

    study, numbers = _hand_made_study()
    figure = pareto_figure(StudyPlotData.from_study(study))
    main, side = figure.axes[:2]

    collections = {c.get_gid(): c for c in _infeasible_collections(side)}
    counts = {gid: len(c.get_offsets()) for gid, c in collections.items()}
    assert counts == {"infeasible:oom": 2, "infeasible:skipped": 1, "infeasible:diverged": 1, "infeasible:failed": 1}
    labels = {c.get_label() for c in collections.values()}
    assert {
        "out of memory (2)",
        "skipped: predicted over budget (1)",
        "diverged (loss not finite) (1)",
        "failed (error) (1)",
    } <= labels
    assert "infeasible trials, excluded (5)" in side.get_title()
    # The micro-batch of each infeasible trial is what the side panel plots.
    assert sorted(y for c in collections.values() for _, y in c.get_offsets()) == sorted(numbers["infeasible_micro"])

    # Nothing infeasible on the main axes: no placeholder values (0 samples/s, loss 1e3) anywhere.
    points = [tuple(xy) for c in main.collections for xy in c.get_offsets()]
    points += [xy for line in main.get_lines() for xy in zip(*line.get_data(), strict=True)]
    assert points and all(x > 0 and y < 1 for x, y in points)
    front = next(line for line in main.get_lines() if line.get_label().startswith("feasible Pareto front"))
    assert sorted(front.get_xdata()) == [2000.0, 2600.0, 2900.0]
    star = next(c for c in main.collections if c.get_label().startswith("recommended"))
    assert [tuple(xy) for xy in star.get_offsets()] == [(2600.0, 0.53)]
    assert "micro-batch 64 × accumulation 2" in star.get_label()


def test_memory_plot_shows_budget_model_and_probes():
    from autobatch.report.figures import memory_figure
    from autobatch.report.plot_data import StudyPlotData

    study, _ = _hand_made_study()
    axes = memory_figure(StudyPlotData.from_study(study)).axes[0]
    labels = axes.get_legend_handles_labels()[1]
    for text in (
        "fitted model: 200.00 MiB + 7.00 MiB × micro-batch",
        "probe runs (3)",
        "memory budget 1.00 GiB",
        "probe limit (budget less 5% margin)",
        "memory wall (probe): micro-batch 100",
        "out of memory",
    ):
        assert any(label.startswith(text) for label in labels), (text, labels)
    model = next(line for line in axes.get_lines() if line.get_label().startswith("fitted model"))
    xs, ys = model.get_data()
    assert ys[-1] == pytest.approx((200 * MIB + 7 * MIB * xs[-1]) / MIB)  # MiB: the budget is under 4 GiB


def test_study_keeps_plots_and_a_note_naming_the_excluded_trials():
    from optuna_dashboard import get_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from autobatch.report.dashboard_plots import DASHBOARD_GRAPH_IDS
    from autobatch.search.note import write_note
    from autobatch.search.results import summarize

    study, numbers = _hand_made_study()
    write_note(study, summarize(study, ""))
    graphs = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    assert set(DASHBOARD_GRAPH_IDS.values()) <= set(graphs)
    pareto = json.loads(graphs[DASHBOARD_GRAPH_IDS["pareto"]])
    assert pareto["layout"]["title"]["text"] == PLOT_TITLES[0]
    note = get_note(study)
    oom = ", ".join(f"#{n}" for n in numbers["oom"])
    assert f"out of memory: {oom}" in note and "Excluded trials:" in note
    assert "micro-batch 64 × accumulation 2" in note


# --- helpers ------------------------------------------------------------------------------------


def _hand_made_study():
    """An in-memory study with a trial of every outcome, as tune() records them."""
    import optuna
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["throughput (samples/s)", "validation loss"])
    budget = 1024 * MIB
    study.set_user_attr(
        "autobatch",
        {
            "task": "hand-made",
            "backend": "torch",
            "device": "cpu",
            "memory_budget_bytes": budget,
            "memory_budget": "1GiB",
            "safety_margin": 0.05,
            "loss_tolerance": 0.02,
        },
    )
    probes = [(4, "ok", 228), (32, "ok", 424), (120, "oom", None), (100, "ok", 900)]
    study.set_user_attr(
        "autobatch_probe",
        {
            "max_micro_batch": 100,
            "budget_bytes": budget,
            "safety_margin": 0.05,
            "seconds": 3.0,
            "memory_model": {"intercept_bytes": 200 * MIB, "bytes_per_sample": 7 * MIB, "points": []},
            "probes": [{"micro_batch": m, "status": s, "peak_memory_bytes": p and p * MIB} for m, s, p in probes],
        },
    )
    numbers = {"oom": [], "infeasible_micro": []}

    def add(micro, accumulation, lr, values, *, state=TrialState.COMPLETE, **outcome):
        attrs = {
            "micro_batch_size": micro,
            "accumulation_steps": accumulation,
            "effective_batch_size": micro * accumulation,
            "learning_rate": lr,
            "memory_budget_bytes": budget,
            "predicted_peak_bytes": (200 + 7 * micro) * MIB,
            "framework": "torch",
            "device": "cpu",
            "skipped_by_model": False,
            "oom": False,
            "oom_phase": None,
            "diverged": False,
            "status": "ok",
            "feasible": True,
            "peak_memory_bytes": (200 + 7 * micro) * MIB,
            "samples_per_second": values[0] if values else None,
        }
        attrs.update(outcome)
        constraint = attrs["peak_memory_bytes"] / budget - 1 if attrs["peak_memory_bytes"] else 0.2
        trial = create_trial(
            state=state,
            values=values,
            user_attrs=attrs,
            system_attrs={"constraints:memory": constraint} if values else {},
        )
        study.add_trial(trial)
        number = len(study.trials) - 1
        if not attrs["feasible"] or attrs["diverged"]:
            numbers["infeasible_micro"].append(micro)
        if attrs["oom"]:
            numbers["oom"].append(number)

    add(16, 1, 1e-3, [1200.0, 0.60])
    add(32, 1, 1.4e-3, [2000.0, 0.52])
    add(110, 1, 2e-3, [0.0, 1e3], status="oom", oom=True, oom_phase="train", feasible=False, peak_memory_bytes=None)
    add(64, 2, 2e-3, [2600.0, 0.53])
    add(8, 4, 1e-3, [800.0, 0.70])
    add(300, 2, 2e-3, [0.0, 1e3], status="skipped", skipped_by_model=True, feasible=False, peak_memory_bytes=None)
    add(96, 1, 3e-3, [2900.0, 0.58])
    add(50, 1, 0.1, [2400.0, 1e3], diverged=True)
    add(
        104, 1, 2e-3, [0.0, 1e3], status="oom", oom=True, oom_phase="eval", feasible=False, peak_memory_bytes=1000 * MIB
    )
    add(40, 1, 1e-3, None, state=TrialState.FAIL, status="error", feasible=False, error="RuntimeError: boom")
    return study, numbers


def _infeasible_collections(axes):
    return [c for c in axes.collections if (c.get_gid() or "").startswith("infeasible:")]


def _artifact_dir(name):
    path = ARTIFACTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _dashboard(storage, port, cwd):
    """``autobatch dashboard`` as a user starts it; killed if the test did not stop it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "autobatch", "dashboard", "--storage", storage, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=20)


def _wait_for_studies(port, process, timeout=60.0) -> list:
    """Poll ``/api/studies`` until the server answers with at least one study."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the dashboard exited with {process.returncode}: {err or out}")
        try:
            with opener.open(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                studies = json.load(response)["study_summaries"]
            if studies:
                return studies
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the dashboard did not answer on port {port} within {timeout} s")


def _rendered_text(chromium, tmp_path, url, screenshot, window_size) -> str:
    """The text of ``url`` as headless Chromium renders it (scripts run), with a screenshot saved."""
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=20000",
        f"--window-size={window_size}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", completed.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))
