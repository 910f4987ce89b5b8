import re

from conftest import cli_in_process, run_cli, tiny_config, write_config


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


def test_bench_without_configs_outside_repo_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = cli_in_process(capsys, "bench")
    assert code == 2 and "experiments/quick_*_teacher.yaml" in err


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


def test_bench_data_times_the_loader_beside_the_step_and_grouping_pads_less(tmp_path, synth_root):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, synth_root))
    result = run_cli("bench", "--data", cfg, "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    rates = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in result.stdout.splitlines()
             if line.startswith("| loader") or line.startswith("| training step")}
    assert list(rates)[:3] == ["loader, 0 process(es)", "loader, 1 process(es)", "loader, 2 process(es)"]
    assert list(rates)[3].startswith("training step (tiny, input") and all(v > 0 for v in rates.values())
    ungrouped, grouped = map(float, re.search(r"(\d+\.\d)% ungrouped, (\d+\.\d)% with", result.stdout).groups())
    assert 0 <= grouped < ungrouped < 100  # COCO's mix of wide and tall images: grouping saves padding
    assert not (tmp_path / "runs").exists()
