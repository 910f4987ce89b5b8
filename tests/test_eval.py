import json
import math
import random

import pytest

from dist2.data.coco import load_coco
from dist2.evaluation import coco_metrics
from dist2.methods import CLASS_AP, COCO_METRICS, COCO_RECALLS, EVAL_BACKENDS

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
    assert list(perfect) == [*COCO_METRICS, *COCO_RECALLS]
    assert perfect["mAP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    assert perfect["AR100"] == pytest.approx(100.0)
    shifted = coco_metrics(coco, _gt_as_results(ann_file, shift=4.0))
    assert 0 < shifted["mAP"] < perfect["mAP"] and shifted["APs"] < shifted["APm"]
    assert coco_metrics(coco, []) == {k: 0.0 for k in (*COCO_METRICS, *COCO_RECALLS)}


def test_wrong_category_scores_zero(synth_root):
    ann_file = synth_root / "annotations/instances_val.json"
    results = _gt_as_results(ann_file)
    ids = sorted({r["category_id"] for r in results})
    swap = dict(zip(ids, ids[1:] + ids[:1], strict=True))
    metrics = coco_metrics(load_coco(ann_file), [{**r, "category_id": swap[r["category_id"]]} for r in results])
    assert metrics["mAP"] == 0.0


def test_cli_eval_predictions_file(tmp_path, synth_root, capsys):
    ann_file = synth_root / "annotations/instances_val.json"
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(_gt_as_results(ann_file, shift=2.0)))
    out = tmp_path / "out" / "metrics.json"
    result = run_cli("eval", "--annotations", ann_file, "--predictions", preds, "--json", out)
    assert result.returncode == 0, result.stderr
    metrics = read_json(out)
    names = [c["name"] for c in json.loads(ann_file.read_text())["categories"]]
    assert list(metrics) == [*COCO_METRICS, *COCO_RECALLS, *(CLASS_AP + n for n in names)]
    expected = coco_metrics(load_coco(ann_file), json.loads(preds.read_text()), "pycocotools", per_class=True)
    for k, value in expected.items():  # the default backend, through the CLI, equals pycocotools' numbers
        assert metrics[k] == pytest.approx(value, abs=0.01) or (metrics[k] is None and math.isnan(value)), k
    code, err = cli_in_process(capsys, "eval", "--annotations", ann_file, "--predictions", preds, "--json", out,
                               "--backend", "pycocotools")
    assert code == 0, err
    reference = read_json(out)
    assert reference.keys() == metrics.keys()
    assert all(reference[k] == pytest.approx(metrics[k], abs=0.01) for k in metrics if metrics[k] is not None)


def _hard_case() -> tuple[dict, list[dict]]:
    """A COCO problem with what trips an evaluator: gapped category ids, crowd regions, an image without objects,
    non-square images of two orientations, boxes of every COCO size range, predictions past the image edge, a
    category with no ground truth, wrong labels and duplicates; and noisy predictions of every box."""
    rng = random.Random(0)
    cats = [{"id": i, "name": n} for i, n in ((1, "person"), (3, "car"), (7, "traffic light"), (90, "toothbrush"))]
    images, anns, results = [], [], []
    for image_id in range(1, 41):
        width, height = (320, 200) if image_id % 2 else (180, 300)
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(0 if image_id == 7 else rng.randint(1, 6)):
            w, h = rng.choice([(10, 12), (25, 40), (90, 110)])  # small, medium and large
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            cat = rng.choice(cats[:3])["id"]
            crowd = int(rng.random() < 0.08)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": crowd})
            for _ in range(rng.randint(1, 3)):  # near the box, past the edge sometimes, another label sometimes
                jitter = [x + rng.gauss(0, 4), y + rng.gauss(0, 4), w * rng.uniform(0.7, 1.6),
                          h * rng.uniform(0.7, 1.6)]
                label = cat if rng.random() < 0.8 else rng.choice(cats)["id"]
                results.append({"image_id": image_id, "category_id": label, "bbox": jitter, "score": rng.random()})
        results.append({"image_id": image_id, "category_id": 90, "score": 0.01,  # a category with no ground truth
                        "bbox": [width - 5, height - 5, 40, 40]})
    return {"images": images, "annotations": anns, "categories": cats}, results


def test_the_default_backend_gives_pycocotools_numbers(tmp_path, synth_root):
    hard, results = _hard_case()
    (tmp_path / "hard.json").write_text(json.dumps(hard))
    synth = synth_root / "annotations/instances_val.json"
    problems = [(load_coco(tmp_path / "hard.json"), results), (load_coco(synth), _gt_as_results(synth, shift=3.0))]
    for coco, found in problems:
        reference = coco_metrics(coco, found, "pycocotools", per_class=True)
        assert 5 < reference["mAP"] < 95  # neither trivial nor hopeless: the numbers can disagree
        for backend in EVAL_BACKENDS:
            metrics = coco_metrics(coco, found, backend, per_class=True)
            assert list(metrics) == list(reference), backend
            for key, value in reference.items():
                assert metrics[key] == pytest.approx(value, abs=0.01) or math.isnan(value) == math.isnan(
                    metrics[key]) and math.isnan(value), (backend, key)
        # COCO's mAP is the mean of the categories' APs; a category without ground truth has none (NaN)
        per_class = [v for k, v in reference.items() if k.startswith(CLASS_AP)]
        assert reference["mAP"] == pytest.approx(sum(v for v in per_class if v == v) / sum(v == v for v in per_class))
    assert math.isnan(coco_metrics(problems[0][0], results, per_class=True)[CLASS_AP + "toothbrush"])


def test_a_category_never_predicted_scores_zero_ap_and_lowers_map(synth_root):
    ann_file = synth_root / "annotations/instances_val.json"
    coco = load_coco(ann_file)
    results = _gt_as_results(ann_file)
    dropped = coco.cats[results[0]["category_id"]]["name"]
    metrics = coco_metrics(coco, [r for r in results if r["category_id"] != results[0]["category_id"]],
                           per_class=True)
    assert metrics[CLASS_AP + dropped] == 0.0
    others = [v for k, v in metrics.items() if k.startswith(CLASS_AP) and k != CLASS_AP + dropped]
    assert others == pytest.approx([100.0] * len(others))
    assert metrics["mAP"] == pytest.approx(100.0 * len(others) / (len(others) + 1))


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


def test_category_metric_names_are_ones_mlflow_takes_and_never_meet(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from dist2.evaluation.coco_eval import class_metrics

    hard, _ = _hard_case()
    hard["categories"] += [{"id": 91, "name": "car(s)"}, {"id": 92, "name": "car[s]"}, {"id": 93, "name": "a/b"},
                           {"id": 94, "name": ".."}, {"id": 95, "name": "person"}]
    (tmp_path / "gt.json").write_text(json.dumps(hard))
    names = class_metrics(load_coco(tmp_path / "gt.json"))
    assert [names[i] for i in (1, 91, 92, 93, 94, 95)] == [
        "AP/person", "AP/car_s_", "AP/car_s__92", "AP/a_b", "AP/94", "AP/person_95"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a real store refuses a name it cannot take
    run = client.create_run(client.create_experiment("names")).info.run_id
    client.log_batch(run, metrics=[Metric(name, 1.0, 0, 2) for name in names.values()])
    assert set(client.get_run(run).data.metrics) == set(names.values())
    # No detections at all: 0 where there was ground truth to find, undefined where there was none.
    empty = coco_metrics(load_coco(tmp_path / "gt.json"), [], per_class=True)
    assert empty["AP/person"] == 0.0 and math.isnan(empty["AP/toothbrush"]) and math.isnan(empty["AP/a_b"])
