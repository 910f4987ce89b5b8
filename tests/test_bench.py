from conftest import run_cli, tiny_config, write_config


def test_bench_prints_throughput_table(tmp_path, synth_root):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, synth_root))
    result = run_cli("bench", cfg, "--steps", "1", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    header, rule, row = result.stdout.strip().splitlines()[-3:]
    assert "img/s" in header and "s/step" in header
    names, values = ([c.strip() for c in line.strip("|").split("|")] for line in (header, row))
    cells = dict(zip(names, values, strict=True))
    assert cells["config"] == "tiny" and cells["batch"] == "2" and float(cells["img/s"]) > 0
    assert not (tmp_path / "runs").exists()  # a benchmark writes no run


def test_bench_without_configs_outside_repo_is_a_usage_error(tmp_path):
    result = run_cli("bench", cwd=tmp_path)
    assert result.returncode == 2 and "experiments/quick_*_teacher.yaml" in result.stderr


def test_bench_coco_eval_times_both_backends_on_one_problem_with_equal_numbers():
    result = run_cli("bench", "--coco-eval", "--images", "60")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "COCO box evaluation: 60 images," in out and "6000 detections" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| pycocotools") or line.startswith("| faster_coco_eval")}
    assert set(rows) == {"pycocotools", "faster_coco_eval"}
    assert rows["pycocotools"][-1] == "1.00"  # the reference's own speed-up
    assert rows["pycocotools"][2:5] == rows["faster_coco_eval"][2:5]  # mAP, AP50, AP75 as printed
    assert 0 < float(rows["pycocotools"][2]) < 100
    assert "largest difference from pycocotools over the 92 metrics (AP, AR, per category): 0.00" in out
