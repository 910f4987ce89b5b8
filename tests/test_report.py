"""`dist2 report` on runs seeded straight into a fresh MLflow store: runs that carry the paper's numbers give
back the paper's tables and deltas exactly; seeds aggregate; unfinished runs and missing cells are never used
or invented; the report is logged to the experiment's ablation run."""

import os
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dist2.methods import EVAL_VERSION
from dist2.report import load_runs, paper, plots, tables

from conftest import REPO, cli_in_process, run_cli

ALL = paper.ALL2ALL
FCOS_MNV2 = ("fcos", "ResNeXt101", "MobileV2C128")
RETINA_MNV2 = ("retinanet", "ResNeXt101", "MobileV2C128")
FCOS_R50 = ("fcos", "ResNeXt101", "ResNet50C128")


def _seed_run(client, experiment_id, pair, method, strategies, mAP, seed=0, lambda_di="", status="FINISHED",
              teacher_head=None, machine=None, classes=None, eval_version=str(EVAL_VERSION), run_dir=None):
    detector, teacher, student = pair
    if (method, strategies) == ("hint", "N2N"):
        method = "fi"  # what dist2 logs for Hint = FI (N2N)
    run = client.create_run(experiment_id, run_name=f"{detector}-{student}-{method}-{strategies}-{seed}")
    params = {"detector": detector, "teacher": teacher, "student": "" if method == "teacher" else student,
              "method": method, "strategies": strategies,
              "num_strategies": str(len(strategies.split(",")) if strategies else 0),
              "lambda_di": lambda_di or ("1.0" if method in ("di", "dist2") else ""),
              "lambda_feat": "1.0" if method in ("fi", "dist2") else "", "seed": str(seed)}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "mAP", mAP)
    for name, value in (classes or {}).items():  # each category's AP, as the final evaluation logs it
        client.log_metric(run.info.run_id, f"AP/{name}", value)
    if machine is not None:
        client.set_tag(run.info.run_id, "dist2.machine", machine)
    if run_dir is not None:
        client.set_tag(run.info.run_id, "dist2.run_dir", run_dir)
    if eval_version is not None:  # None: a run from before dist2 recorded it
        client.set_tag(run.info.run_id, "dist2.eval_version", eval_version)
    if teacher_head is not None:  # (probe, trained adapter)
        client.log_metric(run.info.run_id, "teacher_head_probe_mAP", teacher_head[0])
        if teacher_head[1] is not None:
            client.log_metric(run.info.run_id, "teacher_head_mAP", teacher_head[1])
    client.set_terminated(run.info.run_id, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store holding the paper's numbers as finished runs, minus RetinaNet + PAD."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("paper", artifact_location=(folder / "artifacts").as_uri())
    for (detector, method, strategies), (mAP, _, _) in paper.TABLE1.items():
        pair = FCOS_MNV2 if detector == "fcos" else RETINA_MNV2
        if (detector, method) == ("retinanet", "pad"):
            continue  # a cell nobody ran
        if (detector, method) == ("fcos", "dist2"):
            for seed, value in enumerate((mAP - 0.2, mAP, mAP + 0.2)):  # three seeds: mean = the paper's
                _seed_run(client, exp, pair, method, strategies, value, seed=seed, teacher_head=(30.0 + seed, 40.0),
                          machine="8x NVIDIA H200", classes={"person": 50.0 + seed, "traffic light": 21 + seed / 2})
        elif (detector, method) == ("fcos", "student"):  # no adapter of its own: the probe only
            for seed, value in enumerate((mAP - 0.1, mAP, mAP + 0.1)):
                _seed_run(client, exp, pair, method, strategies, value, seed=seed,
                          teacher_head=(4.0 + seed, None),
                          classes={"person": 40 + seed / 10, "traffic light": 20 + 2 * seed})
        elif (detector, method) == ("fcos", "hint"):  # two seeds far apart: its +1.1 is within their noise
            for seed, value in enumerate((mAP - 1.5, mAP + 1.5)):
                _seed_run(client, exp, pair, method, strategies, value, seed=seed)
        elif (detector, method) == ("fcos", "teacher"):  # a teacher cached before the evaluation last changed
            _seed_run(client, exp, pair, method, strategies, mAP, classes={"person": 60.0, "traffic light": 30.0},
                      eval_version="1")
        elif (detector, method) in (("retinanet", "student"), ("retinanet", "dist2")):  # one category, one seed
            _seed_run(client, exp, pair, method, strategies, mAP, classes={"person": mAP})
        else:
            _seed_run(client, exp, pair, method, strategies, mAP)
    _seed_run(client, exp, FCOS_R50, "teacher", "", 42.7, eval_version=None)
    _seed_run(client, exp, FCOS_R50, "student", "", paper.TABLE2_STUDENT)
    for strategy, (mAP, _) in paper.TABLE2.items():
        _seed_run(client, exp, FCOS_R50, "di", strategy, mAP)
    for k, mAP in paper.TABLE3.items():
        if k > 1:
            _seed_run(client, exp, FCOS_R50, "di", ",".join(sorted(["N2N", "B2B", "B2N", "N2B"][:k])), mAP)
    _seed_run(client, exp, FCOS_R50, "di", "N2N", 30.0, lambda_di="2.0")  # a λ sweep point
    # Never counted: a run still going, a failed one, and a run of another experiment.
    _seed_run(client, exp, FCOS_MNV2, "hint", "N2N", 99.0, seed=7, status="RUNNING", eval_version="1")
    _seed_run(client, exp, FCOS_MNV2, "di", "N2N", 99.0, seed=8, status="FAILED", eval_version="1")
    client.set_experiment_tag(exp, "dist2.command", "dist2 ablate ablations/paper_table1.yaml --set seed=3")
    other = client.create_experiment("other")
    _seed_run(client, other, FCOS_MNV2, "student", "", 1.0, seed=9)

    out = folder / "report"
    result = run_cli("report", "--experiment", "paper", "--tracking-uri", uri, "--out", out)
    assert result.returncode == 0, result.stderr
    return {"uri": uri, "out": out, "text": (out / "results.md").read_text(), "client": client, "exp": exp}


def test_the_report_says_which_command_and_machines_made_its_numbers(store):
    head = store["text"].split("\n## ", 1)[0]
    assert "Command: `dist2 ablate ablations/paper_table1.yaml --set seed=3`" in head
    # Only the three tagged runs name their machine; the failed and running ones are never counted.
    assert "Measured on: 8x NVIDIA H200 (3 run(s))" in head


def test_the_report_names_the_runs_measured_by_another_evaluation_than_todays(store):
    """A teacher cached before a change to the evaluation keeps the numbers of the evaluation it was measured by:
    the report says which runs those are (finished runs only), and says nothing when every run is today's."""
    from dist2.report import evaluation_note, load_runs

    head = store["text"].split("\n## ", 1)[0]
    finished = int(re.search(r"(\d+) finished run\(s\)", head).group(1))
    assert (f"**Evaluation**: 2 of {finished} run(s) were measured by a different evaluation from today's "
            f"(v{EVAL_VERSION}), and their numbers may not compare with the others': fcos-MobileV2C128-teacher--0 "
            f"(evaluation v1); fcos-ResNet50C128-teacher--0 (an evaluation from before versions were recorded). "
            "`python ablations/reevaluate.py paper` measures every run again with today's.") in head
    before = os.environ.get("MLFLOW_TRACKING_URI")
    assert evaluation_note(load_runs(store["uri"], "other"), "other") == []
    # Reading a store in-process leaves the process's default store alone (runs started afterwards keep theirs).
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    # A whole grid measured before: the first ten named, then a count.
    old = load_runs(store["uri"], "paper").assign(eval_version="1")
    note = evaluation_note(old, "paper")[0]
    assert f"{finished} of {finished} run(s)" in note and note.count("(evaluation v1)") == 10
    assert f"; and {finished - 10} more." in note


def test_an_experiment_with_no_finished_run_gives_a_report_that_says_so(store, tmp_path, capsys):
    """Only a failed run in it: the report is written, says 0 finished runs and leaves every table empty."""
    exp = store["client"].create_experiment("nothing_finished")
    _seed_run(store["client"], exp, FCOS_MNV2, "student", "", 5.0, status="FAILED")
    code, err = cli_in_process(capsys, "report", "--experiment", "nothing_finished", "--tracking-uri", store["uri"],
                               "--out", tmp_path)
    assert code == 0, err[-2000:]
    text = (tmp_path / "results.md").read_text()
    assert "0 finished run(s)" in text and "(no runs for this table)" in text and "**Evaluation**" not in text


def _section(text: str, title: str) -> list[list[str]]:
    """The rows of the markdown table under the heading that starts with `title`, as lists of cells."""
    body = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_table1_reproduces_the_paper_numbers_and_deltas(store):
    rows = _section(store["text"], "Table 1")
    checked = 0
    for detector, pair, row, strategy, mAP, delta, seeds, paper_map, paper_delta in rows:
        if pair != "ResNeXt101 → MobileV2C128":
            continue
        if mAP == "–":
            assert (detector, row, strategy) == ("retinanet", "+ PAD", "N2N") and seeds == ""
            assert paper_map == "31.4"  # the paper's number stays beside the missing cell
            continue
        assert mAP.split(" ± ")[0] == paper_map.rstrip("*"), row
        assert delta.split(" ")[0] == paper_delta, row  # e.g. +6.0, signed, one decimal
        checked += 1
    assert checked == 13
    fcos = {r[2]: r[3:7] for r in rows if r[0] == "fcos" and r[1] == "ResNeXt101 → MobileV2C128"}
    # 3 seeds each, Δ 6.0 against a pooled std of 0.16: above the noise
    assert fcos["+ Dist2"] == ["All2All", "36.4 ± 0.2", "+6.0 ✓", "3"]
    # 2 and 3 seeds, Δ 1.1 against a pooled std of 1.23: inside it
    assert fcos["+ Hint = FI (N2N)"] == ["N2N", "31.5 ± 2.1", "+1.1 (within noise)", "2"]
    assert fcos["+ PAD"][2] == "+1.4 (1 seed: no noise estimate)"
    assert fcos["MobileV2C128 (student)"][1:] == ["30.4 ± 0.1", "", "3"]
    assert "twice their pooled seed standard deviation" in store["text"]  # the rule, in the header
    assert "99.0" not in store["text"]  # the RUNNING and FAILED runs


def test_tables_2_and_3_reproduce_the_paper(store):
    rows = {row[0]: row[1:] for row in _section(store["text"], "Table 2")}
    ours, published = rows["ResNeXt101 → ResNet50C128 (fcos)"], rows["paper: ResNeXt101 → ResNet50C128 (FCOS)"]
    assert published == ["33.4", "38.3 (+4.9)", "38.3 (+4.9)", "38.0 (+4.6)", "37.9 (+4.5)"]
    assert ours == ["33.4, n=1"] + [f"{cell.replace(' (', ', n=1; Δ ')[:-1]} (1 seed: no noise estimate)"
                                    for cell in published[1:]]  # e.g. 38.3, n=1; Δ +4.9 (1 seed: ...)
    assert rows["ResNeXt101 → MobileV2C128 (retinanet)"][1:] == [  # DI at N2N only
        "32.4, n=1; Δ +1.4 (1 seed: no noise estimate)", "–", "–", "–"]
    rows = {tuple(row[:2]): row[2:] for row in _section(store["text"], "Table 3")}
    ours = rows[("ResNeXt101 → ResNet50C128 (fcos)", "first k")]
    published = rows[("paper: ResNeXt101 → ResNet50C128 (FCOS)", "first k (as transcribed)")]
    assert [cell.split(",")[0] for cell in ours] == published == ["38.3", "38.3", "38.0", "37.9"]
    assert ours[1] == "38.3, n=1; Δ +4.9 (1 seed: no noise estimate)"


def test_lambda_table_teacher_head_plots_and_summary_run(store, capsys):
    rows = _section(store["text"], "λ_DI")
    n2n = next(r for r in rows if r[0] == "ResNeXt101 → ResNet50C128 (fcos)" and r[2] == "N2N")
    assert n2n[4:] == ["38.3, n=1", "30.0, n=1"]  # λ_DI = 1.0, 2.0
    table = store["text"].split("## Teacher-head mAP", 1)[1]
    assert "teacher head, probe (every run)" in table and "teacher head, the run's own N2N adapter" in table
    assert "probe Δ over the student" in table
    # probe: seeds 30, 31, 32 against the student's 4, 5, 6 (pooled std 1.0: +26.0 is far above it); adapter: 40 x 3
    head = {r[1]: r[-3:] for r in _section(store["text"], "Teacher-head mAP")}
    assert head == {"+ Dist2": ["31.0 ± 1.0", "+26.0 ✓", "40.0 ± 0.0"], "(student)": ["5.0 ± 1.0", "", "–"]}
    for picture in ("table1.png", "table2.png", "lambda_di.png"):
        assert (store["out"] / picture).stat().st_size > 1000 and f"]({picture})" in store["text"]
    # An experiment no `dist2 ablate` made gets an ablation run for its report, and only one: reported again,
    # the same run takes the new report.
    client = store["client"]
    code, err = cli_in_process(capsys, "report", "--experiment", "paper", "--tracking-uri", store["uri"],
                               "--out", store["out"])
    assert code == 0, err
    summary = client.search_runs([store["exp"]], "tags.`dist2.kind` = 'ablation'")
    assert len(summary) == 1 and summary[0].info.status == "FINISHED" and summary[0].info.run_name == "paper"
    logged = {a.path for a in client.list_artifacts(summary[0].info.run_id, "report")}
    assert {"report/results.md", "report/table1.png", "report/table2.png", "report/lambda_di.png"} <= logged


def test_table1_plot_draws_each_rows_delta_with_its_noise_beside_the_papers(store):
    series = plots.table1_deltas(tables.cells(load_runs(store["uri"], "paper")))
    assert list(series) == ["ResNeXt101 → MobileV2C128 (fcos)", "paper: ResNeXt101 → MobileV2C128 (fcos)",
                            "ResNeXt101 → MobileV2C128 (retinanet)", "paper: ResNeXt101 → MobileV2C128 (retinanet)",
                            "ResNeXt101 → ResNet50C128 (fcos)"]  # the paper's FCOS bars once
    fcos, fcos_paper = series["ResNeXt101 → MobileV2C128 (fcos)"], series["paper: ResNeXt101 → MobileV2C128 (fcos)"]
    assert set(fcos) == set(fcos_paper) == {("hint", "N2N"), ("pad", "N2N"), ("nonlocal", "N2N"), ("di", "N2N"),
                                            ("dist2", ALL)}  # Hint once: the FI (N2N) runs are its row
    for key, (delta, _) in fcos.items():
        assert delta == pytest.approx(fcos_paper[key][0], abs=1e-9) and fcos_paper[key][1] == 0.0
    # error bar = the pooled seed std: Dist2 (3 seeds ±0.2) with the student (3 seeds ±0.1), Hint (2 seeds ±1.5)
    # with the student; none where a cell has one seed (PAD)
    assert fcos[("dist2", ALL)][1] == pytest.approx((2 * (0.2**2 + 0.1**2) / 4) ** 0.5)
    assert fcos[("hint", "N2N")][1] == pytest.approx(((2 * 1.5**2 + 2 * 0.1**2) / 3) ** 0.5)
    assert fcos[("pad", "N2N")][1] == 0.0
    # a cell nobody ran is no bar of ours, and the paper's number is still drawn
    retina = series["ResNeXt101 → MobileV2C128 (retinanet)"]
    assert ("pad", "N2N") not in retina
    assert series["paper: ResNeXt101 → MobileV2C128 (retinanet)"][("pad", "N2N")] == (0.4, 0.0)


def test_one_report_over_a_grid_and_a_later_grid_that_added_seeds(store, tmp_path, capsys):
    """`--experiment` twice: the rows of both, each run once (the cached teacher is recorded by both grids), both
    commands in the header, and the report logged to each experiment's ablation run."""
    client = store["client"]
    first, later = client.create_experiment("grid_first"), client.create_experiment("grid_later")
    for exp, command in ((first, "dist2 ablate a.yaml"), (later, "dist2 ablate a.yaml --set name=grid_later")):
        client.set_experiment_tag(exp, "dist2.command", command)
        _seed_run(client, exp, FCOS_MNV2, "teacher", "", 50.0, run_dir="/runs/teachers/t-1234")
    for seed, mAP in enumerate((10.0, 12.0)):
        _seed_run(client, first, FCOS_MNV2, "student", "", mAP, seed=seed, run_dir=f"/runs/g/student-s{seed}")
    _seed_run(client, first, FCOS_MNV2, "dist2", ALL, 20.0, seed=0, run_dir="/runs/g/dist2-s0")
    _seed_run(client, later, FCOS_MNV2, "dist2", ALL, 23.0, seed=1, run_dir="/runs/g2/dist2-s1")
    code, err = cli_in_process(capsys, "report", "--experiment", "grid_first", "--experiment", "grid_later",
                               "--tracking-uri", store["uri"], "--out", tmp_path)
    assert code == 0, err
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# grid_first + grid_later: results")
    assert "Command: `dist2 ablate a.yaml`; `dist2 ablate a.yaml --set name=grid_later`" in text
    assert "5 finished run(s)" in text  # 2 + 4 runs, the shared teacher once
    rows = {r[2]: r[4:7] for r in _section(text, "Table 1")}
    assert rows["+ Dist2"] == ["21.5 ± 2.1", "+10.5 ✓", "2"]  # a seed from each grid; pooled std 1.80
    assert rows["MobileV2C128 (student)"] == ["11.0 ± 1.4", "", "2"]
    for exp in (first, later):
        (summary,) = client.search_runs([exp], "tags.`dist2.kind` = 'ablation'")
        assert "report/results.md" in {a.path for a in client.list_artifacts(summary.info.run_id, "report")}


@pytest.mark.parametrize("row, expected", [
    ({"mAP": 32.0, "std": 0.5, "n": 3}, "+2.0 ✓"),  # pooled std 0.5: 2.0 > 1.0
    ({"mAP": 31.0, "std": 0.5, "n": 3}, "+1.0 (within noise)"),  # exactly twice the pooled std: not above
    ({"mAP": 29.0, "std": 0.5, "n": 3}, "-1.0 (within noise)"),
    ({"mAP": 28.5, "std": 0.5, "n": 3}, "-1.5 ✓"),  # a loss above the noise is marked too
    ({"mAP": 35.0, "std": float("nan"), "n": 1}, "+5.0 (1 seed: no noise estimate)"),
])
def test_a_delta_is_above_noise_only_beyond_twice_the_pooled_seed_std(row, expected):
    from dist2.report.tables import marked_delta

    assert marked_delta(row, {"mAP": 30.0, "std": 0.5, "n": 3}) == expected


def test_teacher_head_deltas_use_that_metrics_own_seed_spread():
    from dist2.report.tables import marked_delta

    probe = "teacher_head_probe_mAP"
    fi = {"mAP": 50.0, "std": 9.0, "n": 3, probe: 40.0, f"{probe}|std": 0.5, f"{probe}|n": 3}
    di = {"mAP": 50.0, "std": 9.0, "n": 3, probe: 38.0, f"{probe}|std": 0.5, f"{probe}|n": 3}
    assert marked_delta(fi, di, probe) == "+2.0 ✓"  # mAP's std (9.0) would have called it noise
    assert marked_delta(fi, {**di, f"{probe}|n": 1}, probe) == "+2.0 (1 seed: no noise estimate)"


def test_report_of_an_unknown_experiment_is_a_clear_error(store, tmp_path, capsys):
    code, err = cli_in_process(capsys, "report", "--experiment", "nope", "--tracking-uri", store["uri"],
                               "--out", tmp_path)
    assert code == 2
    assert re.search(r"no MLflow experiment 'nope' in sqlite:.*experiments there: .*paper", err)
    assert not (tmp_path / "results.md").exists()


def test_per_category_table_shows_teacher_student_and_the_best_run_with_marked_deltas(store):
    rows = _section(store["text"], "Per-category AP")
    header = store["text"].split("## Per-category AP", 1)[1].splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")] == ["pair", "category", "teacher", "student",
                                                                 "best run", "best run AP", "Δ"]
    # Two pairs logged categories (RetinaNet's student and Dist2 one, its teacher none); each pair's best run is
    # its highest mAP, Dist2 All2All for both.
    assert [r[:2] for r in rows] == [["ResNeXt101 → MobileV2C128 (fcos)", "person"],
                                     ["ResNeXt101 → MobileV2C128 (fcos)", "traffic light"],
                                     ["ResNeXt101 → MobileV2C128 (retinanet)", "person"]]
    # person: 50, 51, 52 against the student's 40.0, 40.1, 40.2 (pooled std 0.71): above the noise;
    # traffic light: 21, 21.5, 22 against 20, 22, 24 (pooled std 1.46): -0.5 is inside it
    assert rows[0][2:] == ["60.0", "40.1 ± 0.1", "+ Dist2 (All2All)", "51.0 ± 1.0", "+10.9 ✓"]
    assert rows[1][2:] == ["30.0", "22.0 ± 2.0", "+ Dist2 (All2All)", "21.5 ± 0.5", "-0.5 (within noise)"]
    assert rows[2][2:] == ["–", "31.0", "+ Dist2 (All2All)", "32.5", "+1.5 (1 seed: no noise estimate)"]
    assert not re.search(r"\bnan\b", store["text"])  # no cell of any table left undefined


def test_report_from_an_ablation_file_uses_its_store_tables_and_folder(store, tmp_path):
    import yaml

    folder = Path(store["uri"].removeprefix("sqlite:///")).parent
    ablation = tmp_path / "paper.yaml"
    ablation.write_text(yaml.safe_dump({
        "name": "paper", "output_dir": str(folder), "tables": ["table1"],
        "pairs": [{"teacher": str(REPO / "experiments/quick_fcos_teacher.yaml"),
                   "student": str(REPO / "experiments/quick_fcos_student.yaml")}],
        "grid": [{"method": ["student"]}]}))
    result = run_cli("report", ablation)
    assert result.returncode == 0, result.stderr
    text = (folder / "paper" / "report" / "results.md").read_text()
    assert "## Table 1" in text and "## Table 2" not in text  # the file's tables: only
    assert _section(text, "Table 1") == _section(store["text"], "Table 1")

    neither = run_cli("report")
    both = run_cli("report", ablation, "--experiment", "paper")
    for bad in (neither, both):
        assert bad.returncode == 2 and "needs an ABLATION file or --experiment NAME" in bad.stderr
