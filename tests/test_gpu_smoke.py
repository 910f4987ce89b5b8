"""The GPU smoke check: run for real where CUDA is (a lent GPU machine: `pytest tests/test_gpu_smoke.py`), and its
refusal everywhere else."""

import pytest
import torch

from conftest import REPO, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the smoke check itself runs")
def test_gpu_smoke_without_cuda_is_a_clear_usage_error():
    result = run_cli("bench", "--gpu-smoke", cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == "dist2: error: dist2 bench --gpu-smoke needs a CUDA GPU " \
                                    "(torch.cuda.is_available() is False here)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_trains_distils_and_times_on_cuda():
    result = run_cli("bench", "--gpu-smoke", cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 4 and "Ray Train, 1 worker, NCCL" in rows[1]
    assert all(float(row.split("|")[4]) > 0 for row in rows)  # train img/s
