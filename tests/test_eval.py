import json
import math

import pytest

from dist2.data.coco import load_coco
from dist2.evaluation import METRIC_KEYS, coco_metrics

from conftest import read_json, run_cli


def _gt_as_results(ann_file, shift=0.0):
    coco = json.loads(ann_file.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in coco["annotations"] if not a["iscrowd"]]


def test_perfect_shifted_and_empty_predictions(synth_root):
    ann_file = synth_root / "annotations/instances_val.json"
    coco = load_coco(ann_file)
    perfect = coco_metrics(coco, _gt_as_results(ann_file))
    assert list(perfect) == list(METRIC_KEYS)
    assert perfect["mAP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    shifted = coco_metrics(coco, _gt_as_results(ann_file, shift=4.0))
    assert 0 < shifted["mAP"] < perfect["mAP"] and shifted["APs"] < shifted["APm"]
    assert coco_metrics(coco, []) == {k: 0.0 for k in METRIC_KEYS}


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
    assert list(metrics) == list(METRIC_KEYS)
    expected = coco_metrics(load_coco(ann_file), json.loads(preds.read_text()))
    for k in METRIC_KEYS:
        assert metrics[k] == pytest.approx(expected[k]) or (metrics[k] is None and math.isnan(expected[k]))


@pytest.mark.parametrize("content, message", [
    ("[{\"image_id\": 1}]", "result 0 lacks keys ['bbox', 'category_id', 'score']"),
    ("[{\"image_id\": 99999, \"category_id\": 1, \"bbox\": [0, 0, 1, 1], \"score\": 1}]", "image_id 99999"),
    ("[{\"image_id\": 1, \"category_id\": 2, \"bbox\": [0, 0, 1, 1], \"score\": 1}]", "category_id 2"),
    ("{\"a\": 1}", "expected a JSON list"),
    ("not json", "not a readable JSON file"),
])
def test_cli_eval_bad_predictions(tmp_path, synth_root, content, message):
    preds = tmp_path / "preds.json"
    preds.write_text(content)
    result = run_cli("eval", "--annotations", synth_root / "annotations/instances_val.json",
                     "--predictions", preds, "--json", tmp_path / "m.json")
    assert result.returncode == 2
    assert f"{preds}: " in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.json").exists()
