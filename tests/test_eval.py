import json
import math

import pytest

from dist2.data.coco import load_coco
from dist2.evaluation import coco_metrics
from dist2.methods import COCO_METRICS

from conftest import cli_in_process, read_json, run_cli


def _gt_as_results(ann_file, shift=0.0):
    coco = json.loads(ann_file.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in coco["annotations"] if not a["iscrowd"]]


def test_perfect_shifted_and_empty_predictions(synth_root):
    ann_file = synth_root / "annotations/instances_val.json"
    coco = load_coco(ann_file)
    perfect = coco_metrics(coco, _gt_as_results(ann_file))
    assert list(perfect) == list(COCO_METRICS)
    assert perfect["mAP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    shifted = coco_metrics(coco, _gt_as_results(ann_file, shift=4.0))
    assert 0 < shifted["mAP"] < perfect["mAP"] and shifted["APs"] < shifted["APm"]
    assert coco_metrics(coco, []) == {k: 0.0 for k in COCO_METRICS}


def test_wrong_category_scores_zero(synth_root):
    ann_file = synth_root / "annotations/instances_val.json"
    results = _gt_as_results(ann_file)
    ids = sorted({r["category_id"] for r in results})
    swap = dict(zip(ids, ids[1:] + ids[:1], strict=True))
    metrics = coco_metrics(load_coco(ann_file), [{**r, "category_id": swap[r["category_id"]]} for r in results])
    assert metrics["mAP"] == 0.0


def test_cli_eval_predictions_file(tmp_path, synth_root):
    ann_file = synth_root / "annotations/instances_val.json"
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(_gt_as_results(ann_file, shift=2.0)))
    out = tmp_path / "out" / "metrics.json"
    result = run_cli("eval", "--annotations", ann_file, "--predictions", preds, "--json", out)
    assert result.returncode == 0, result.stderr
    metrics = read_json(out)
    assert list(metrics) == list(COCO_METRICS)
    expected = coco_metrics(load_coco(ann_file), json.loads(preds.read_text()))
    for k in COCO_METRICS:
        assert metrics[k] == pytest.approx(expected[k]) or (metrics[k] is None and math.isnan(expected[k]))


@pytest.mark.parametrize("content, message", [
    ("[{\"image_id\": 1}]", "result 0 lacks keys ['bbox', 'category_id', 'score']"),
    ("[{\"image_id\": 99999, \"category_id\": 1, \"bbox\": [0, 0, 1, 1], \"score\": 1}]", "image_id 99999"),
    ("[{\"image_id\": 1, \"category_id\": 2, \"bbox\": [0, 0, 1, 1], \"score\": 1}]", "category_id 2"),
    ("{\"a\": 1}", "expected a JSON list"),
    ("not json", "not a readable JSON file"),
])
def test_cli_eval_bad_predictions(tmp_path, synth_root, capsys, content, message):
    preds = tmp_path / "preds.json"
    preds.write_text(content)
    args = ("eval", "--annotations", synth_root / "annotations/instances_val.json", "--predictions", preds,
            "--json", tmp_path / "m.json")
    code, err = cli_in_process(capsys, *args)
    assert code == 2
    assert f"{preds}: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()
    if content == "not json":  # once as a user meets it: the installed command
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.strip() == err.strip()


def _broken(ann: dict, case: str) -> str:
    """`ann` (a COCO instances dict) broken one way; returns the message the CLI must print."""
    first, second = ann["annotations"][0], ann["annotations"][1]
    if case == "bbox of three":
        first["bbox"] = first["bbox"][:3]
        return f"annotation id {first['id']}: bbox must be four numbers [x, y, width, height]"
    if case == "bbox of text":
        first["bbox"] = [1, 2, "3", 4]
        return f"annotation id {first['id']}: bbox must be four numbers"
    if case == "unknown image":
        first["image_id"] = 99999
        return f"annotation id {first['id']}: image_id 99999 is not in images"
    if case == "area of text":
        first["area"] = "big"
        return f"annotation id {first['id']}: area must be a number (got 'big')"
    if case == "iscrowd of text":
        first["iscrowd"] = "no"
        return f"annotation id {first['id']}: iscrowd must be 0 or 1 (got 'no')"
    if case == "duplicate annotation id":
        second["id"] = first["id"]
        return f"annotation id {first['id']} appears more than once in annotations"
    assert case == "duplicate image id"
    ann["images"][1]["id"] = ann["images"][0]["id"]
    return f"image id {ann['images'][0]['id']} appears more than once in images"


@pytest.mark.parametrize("case", ["bbox of three", "bbox of text", "unknown image", "area of text",
                                  "iscrowd of text", "duplicate annotation id", "duplicate image id"])
def test_cli_eval_malformed_annotations(tmp_path, synth_root, capsys, case):
    source = synth_root / "annotations/instances_val.json"
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(_gt_as_results(source)))
    ann = json.loads(source.read_text())
    message = _broken(ann, case)
    bad = tmp_path / "instances.json"
    bad.write_text(json.dumps(ann))
    args = ("eval", "--annotations", bad, "--predictions", preds, "--json", tmp_path / "m.json")
    code, err = cli_in_process(capsys, *args)
    assert code == 2, err
    assert f"{bad}: {message}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.json").exists()
    if case == "bbox of text":  # once as a user meets it: the installed command, its exit code and one line
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.strip() == err.strip()
    assert not (tmp_path / "m.json").exists()
