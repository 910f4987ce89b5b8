"""`dist2 report` on runs seeded straight into a fresh MLflow store: runs that carry the paper's numbers give
back the paper's tables and deltas exactly; seeds aggregate; unfinished runs and missing cells are never used
or invented; the report is logged to a summary run."""

import re

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

from dist2.report import paper

ALL = paper.ALL2ALL
FCOS_MNV2 = ("fcos", "ResNeXt101", "MobileV2C128")
RETINA_MNV2 = ("retinanet", "ResNeXt101", "MobileV2C128")
FCOS_R50 = ("fcos", "ResNeXt101", "ResNet50C128")


def _seed_run(client, experiment_id, pair, method, strategies, mAP, seed=0, lambda_di="", status="FINISHED",
              teacher_head=None):
    detector, teacher, student = pair
    run = client.create_run(experiment_id, run_name=f"{detector}-{student}-{method}-{strategies}-{seed}")
    params = {"detector": detector, "teacher": teacher, "student": "" if method == "teacher" else student,
              "method": method, "strategies": strategies,
              "num_strategies": str(len(strategies.split(",")) if strategies else 0),
              "lambda_di": lambda_di or ("1.0" if method in ("di", "dist2") else ""),
              "lambda_feat": "1.0" if method in ("fi", "dist2") else "", "seed": str(seed)}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "mAP", mAP)
    if teacher_head is not None:
        client.log_metric(run.info.run_id, "teacher_head_mAP", teacher_head)
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
                _seed_run(client, exp, pair, method, strategies, value, seed=seed, teacher_head=40.0)
        else:
            _seed_run(client, exp, pair, method, strategies, mAP)
    _seed_run(client, exp, FCOS_R50, "teacher", "", 42.7)
    _seed_run(client, exp, FCOS_R50, "student", "", paper.TABLE2_STUDENT)
    for strategy, (mAP, _) in paper.TABLE2.items():
        _seed_run(client, exp, FCOS_R50, "di", strategy, mAP)
    for k, mAP in paper.TABLE3.items():
        if k > 1:
            _seed_run(client, exp, FCOS_R50, "di", ",".join(sorted(["N2N", "B2B", "B2N", "N2B"][:k])), mAP)
    _seed_run(client, exp, FCOS_R50, "di", "N2N", 30.0, lambda_di="2.0")  # a λ sweep point
    # Never counted: a run still going, a failed one, and a run of another experiment.
    _seed_run(client, exp, FCOS_MNV2, "hint", "N2N", 99.0, seed=7, status="RUNNING")
    _seed_run(client, exp, FCOS_MNV2, "di", "N2N", 99.0, seed=8, status="FAILED")
    other = client.create_experiment("other")
    _seed_run(client, other, FCOS_MNV2, "student", "", 1.0, seed=9)

    out = folder / "report"
    result = run_cli("report", "--experiment", "paper", "--tracking-uri", uri, "--out", out)
    assert result.returncode == 0, result.stderr
    return {"uri": uri, "out": out, "text": (out / "results.md").read_text(), "client": client, "exp": exp}


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
        assert delta == paper_delta, row  # e.g. +6.0, signed, one decimal
        checked += 1
    assert checked == 13
    dist2 = next(r for r in rows if r[0] == "fcos" and r[2] == "+ Dist2")
    assert dist2[3:7] == ["All2All", "36.4 ± 0.2", "+6.0", "3"]
    assert "99.0" not in store["text"]  # the RUNNING and FAILED runs


def test_tables_2_and_3_reproduce_the_paper(store):
    rows = {row[0]: row[1:] for row in _section(store["text"], "Table 2")}
    ours, published = rows["ResNeXt101 → ResNet50C128 (fcos)"], rows["paper: ResNeXt101 → ResNet50C128 (FCOS)"]
    assert ours == published == ["33.4", "38.3 (+4.9)", "38.3 (+4.9)", "38.0 (+4.6)", "37.9 (+4.5)"]
    assert rows["ResNeXt101 → MobileV2C128 (retinanet)"][1:] == ["32.4 (+1.4)", "–", "–", "–"]  # DI at N2N only
    rows = {tuple(row[:2]): row[2:] for row in _section(store["text"], "Table 3")}
    ours = rows[("ResNeXt101 → ResNet50C128 (fcos)", "first k")]
    published = rows[("paper: ResNeXt101 → ResNet50C128 (FCOS)", "first k (as transcribed)")]
    assert [cell.split(" (")[0] for cell in ours] == published == ["38.3", "38.3", "38.0", "37.9"]
    assert ours[1] == "38.3 (+4.9)"


def test_lambda_table_teacher_head_plots_and_summary_run(store):
    rows = _section(store["text"], "λ_DI")
    n2n = next(r for r in rows if r[0] == "ResNeXt101 → ResNet50C128 (fcos)" and r[2] == "N2N")
    assert n2n[4:] == ["38.3", "30.0"]  # λ_DI = 1.0, 2.0
    head = _section(store["text"], "Teacher-head mAP")
    assert [r[-1] for r in head if r[1] == "+ Dist2"] == ["40.0"]
    for picture in ("table2.png", "lambda_di.png"):
        assert (store["out"] / picture).stat().st_size > 1000 and f"]({picture})" in store["text"]
    client = store["client"]
    summary = client.search_runs([store["exp"]], "tags.`dist2.kind` = 'report'")
    assert len(summary) == 1 and summary[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(summary[0].info.run_id, "report")}
    assert {"report/results.md", "report/table2.png", "report/lambda_di.png"} <= logged


def test_report_of_an_unknown_experiment_is_a_clear_error(store, tmp_path):
    result = run_cli("report", "--experiment", "nope", "--tracking-uri", store["uri"], "--out", tmp_path)
    assert result.returncode == 2
    assert re.search(r"no MLflow experiment 'nope' in sqlite:.*experiments there: .*paper", result.stderr)
    assert not (tmp_path / "results.md").exists()
