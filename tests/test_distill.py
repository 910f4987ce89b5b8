import copy
import itertools

import pytest
import torch

from dist2.config import DataConfig, DistillConfig, ModelConfig, NonLocalConfig
from dist2.data.build import build_datasets
from dist2.distill.distiller import Distiller
from dist2.distill.imitation import Imitation, level_count
from dist2.distill.losses import LOSSES
from dist2.distill.teacher_head import fit_linear_probe, teacher_head_map
from dist2.evaluation import evaluate
from dist2.methods import STRATEGIES
from dist2.modeling import build_detector

from conftest import cli_in_process, distill_config, read_json, run_cli, tiny_config, write_config

DATA = dict(train_sizes=[96], test_size=96, max_size=160, hflip_prob=0.0)


@pytest.fixture(scope="module")
def data(synth_root):
    train, val = build_datasets(DataConfig(root=synth_root, **DATA))
    samples = [train[i] for i in range(2)]
    return train, val, [s[0] for s in samples], [s[1] for s in samples]


def _model(categories, detector, backbone="resnet10", channels=32, width=1.0, seed=0):
    torch.manual_seed(seed)
    return build_detector(ModelConfig(detector=detector, backbone=backbone, channels=channels, width_mult=width),
                          DataConfig(**DATA), categories)


def _teacher_own_loss(teacher, images, targets):
    image_list, targets, _ = teacher.preprocess(images, targets)
    p = teacher.neck_stage(teacher.backbone_stage(image_list.tensors))
    anchors = teacher.anchors(image_list, p)
    return teacher.loss_stage(targets, teacher.head_stage(p), anchors, teacher.match(targets, anchors, p))


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_self_distillation_invariant(data, detector):
    """Student = a copy of the teacher, identity adapters: DI = the teacher's own loss, FI = 0, and the
    teacher's head on the adapted student neck scores exactly the teacher's mAP. (B2N and N2B map between
    backbone and neck channels, where no identity exists, so the invariant covers N2N and B2B.)"""
    train, val, images, targets = data
    teacher = _model(train.categories, detector)
    student = copy.deepcopy(teacher)
    distiller = Distiller(student, teacher, DistillConfig(method="dist2", strategies=["N2N", "B2B"]))
    for adapter in distiller.adapters.values():
        adapter.identity_()
    distiller.eval()  # the copy's BatchNorm must use the same running statistics as the frozen teacher
    with torch.no_grad():
        losses = distiller(images, targets)
        own = sum(_teacher_own_loss(teacher, images, targets).values())
    for strategy in ("N2N", "B2B"):
        torch.testing.assert_close(losses[f"loss_di/{strategy}"], own, rtol=1e-5, atol=1e-6)
        assert losses[f"loss_fi/{strategy}"].item() == pytest.approx(0.0, abs=1e-10)
    teacher_map = evaluate(teacher, val, torch.device("cpu"), 4)["mAP"]
    cpu = torch.device("cpu")
    assert teacher_head_map(student, teacher, distiller.adapters["N2N"], val, cpu, 4, "faster_coco_eval") == \
        pytest.approx(teacher_map)
    # With no trained N2N adapter a least-squares probe is fitted: for a copy of the teacher it reproduces the
    # teacher's features, so the teacher's head scores (almost) the teacher's mAP.
    probe = fit_linear_probe(student, teacher, train, cpu)
    assert teacher_head_map(student, teacher, probe, val, cpu, 4, "faster_coco_eval") == \
        pytest.approx(teacher_map, abs=0.5)


def test_teacher_frozen_bit_identical_and_outside_the_optimised_module(data):
    train, _, images, targets = data
    teacher = _model(train.categories, "fcos", seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _model(train.categories, "fcos", "mobilenet_v2", 32, 0.5)
    distiller = Distiller(student, teacher, DistillConfig(method="dist2", strategies=["All2All"]))
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    teacher_params = {id(p) for p in teacher.parameters()}
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    assert not teacher_params & {id(p) for p in trainable}
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    distiller.train()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    for _ in range(3):
        loss = sum(distiller(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_di_alone_reaches_the_student_backbone_through_the_teacher(data, strategy):
    train, _, images, targets = data
    teacher = _model(train.categories, "fcos", seed=1)
    student = _model(train.categories, "fcos", "mobilenet_v2", 32, 0.5)
    cfg = DistillConfig(method="di", strategies=[strategy], lambda_feat=0.0, student_loss=False)
    distiller = Distiller(student, teacher, cfg).train()
    losses = distiller(images, targets)
    assert list(losses) == [f"loss_di/{strategy}"]
    losses[f"loss_di/{strategy}"].backward()
    grads = [p.grad for p in student.backbone.body.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    head_grads = [p.grad for p in student.head.parameters()]
    assert all(g is None for g in head_grads)  # only the DI path was used


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_batched_teacher_pass_equals_one_pass_per_strategy(data, detector):
    """All strategies' DI run through the teacher as one batch; each term and its gradient must be what a
    separate pass for that strategy alone gives."""
    train, _, images, targets = data
    teacher = _model(train.categories, detector, "resnet10", 64, seed=1)
    student = _model(train.categories, detector, "mobilenet_v2", 32, 0.5)
    distiller = Distiller(student, teacher, DistillConfig(method="di", strategies=["All2All"]))
    image_list, prepared, _ = student.preprocess(images, targets)
    t_feats = dict(zip("BN", distiller.teacher_features(image_list.tensors), strict=True))
    anchors = teacher.anchors(image_list, t_feats["N"])
    matched = teacher.match(prepared, anchors, t_feats["N"])
    injected = {s: [(t + 0.1 * torch.randn_like(t)).requires_grad_(True) for t in t_feats[s[2]][:level_count(s)]]
                for s in STRATEGIES}

    def terms_and_grads(groups):
        values = {}
        for group in groups:
            for strategy, terms in distiller.teacher_losses({s: injected[s] for s in group}, prepared, anchors,
                                                            matched).items():
                values[strategy] = torch.stack(list(terms.values()))
        inputs = [t for s in STRATEGIES for t in injected[s]]
        grads = iter(torch.autograd.grad(sum(v.sum() for v in values.values()), inputs))
        return values, {s: [next(grads) for _ in injected[s]] for s in STRATEGIES}

    batched_values, batched_grads = terms_and_grads([STRATEGIES])
    alone_values, alone_grads = terms_and_grads([[s] for s in STRATEGIES])
    for strategy in STRATEGIES:
        torch.testing.assert_close(batched_values[strategy], alone_values[strategy], rtol=1e-5, atol=1e-6)
        for batched, alone in zip(batched_grads[strategy], alone_grads[strategy], strict=True):
            torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-7)


SUBSETS = [list(c) for k in range(1, 5) for c in itertools.combinations(STRATEGIES, k)]


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_every_strategy_subset_runs_with_stride_matched_levels(data, detector):
    train, _, images, targets = data
    teacher = _model(train.categories, detector, "resnet10", 64, seed=1)
    student = _model(train.categories, detector, "mobilenet_v2", 32, 0.5)
    for subset in SUBSETS + [["All2All"]]:
        distiller = Distiller(student, teacher, DistillConfig(method="dist2", strategies=subset)).train()
        expected = STRATEGIES if subset == ["All2All"] else subset
        assert list(distiller.adapters) == [s for s in STRATEGIES if s in expected]
        for strategy, adapter in distiller.adapters.items():
            levels = [(c.in_channels, c.out_channels) for c in adapter.levels]
            s_ch = {"B": [16, 48, 160], "N": [32] * 5}[strategy[0]]  # mobilenet_v2 x0.5: C3-C5 channels
            t_ch = {"B": [128, 256, 512], "N": [64] * 5}[strategy[2]]
            n = 5 if strategy == "N2N" else 3
            assert levels == list(zip(s_ch[:n], t_ch[:n], strict=True)), strategy
        losses = distiller(images, targets)
        names = {f"loss_{kind}/{s}" for s in expected for kind in ("fi", "di")}
        assert names <= set(losses) and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()


@pytest.mark.parametrize("name", ["fi", "pad", "nonlocal"])
def test_baseline_losses_zero_for_identical_features_positive_otherwise(name):
    torch.manual_seed(0)
    cfg = DistillConfig(method=name, strategies=["N2N"], **({"nonlocal": NonLocalConfig()} if name else {}))
    s_ch, t_ch = [32] * 5, [64] * 5
    loss = LOSSES[name](cfg, s_ch, t_ch)
    student = [torch.randn(2, 32, 2 ** (5 - i), 2 ** (5 - i)) for i in range(5)]
    teacher = [torch.randn(2, 64, 2 ** (5 - i), 2 ** (5 - i)) for i in range(5)]
    same = loss(Imitation("N2N", student, [t.clone() for t in teacher], teacher, None))
    other = loss(Imitation("N2N", student, [t + torch.randn_like(t) for t in teacher], teacher, None))
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in same.values()), same
    assert all(v.item() > 1e-4 for v in other.values()), other


def test_cli_distill_end_to_end_and_teacher_guard(tmp_path, synth_root, teacher, capsys):
    teacher_yaml, teacher_dir, _ = teacher  # the session's teacher (trained on other images of the same classes)
    checkpoint = teacher_dir / "model.pth"
    cfg_path = write_config(tmp_path / "d.yaml", distill_config(tmp_path, synth_root, teacher_yaml, checkpoint))

    code, err = cli_in_process(capsys, "distill", cfg_path, "--set", "teacher.min_mAP=99")
    assert code == 2 and "below teacher.min_mAP = 99.0" in err
    assert not (tmp_path / "runs/student_di").exists()

    broken = {k: v for k, v in torch.load(checkpoint, weights_only=True).items() if "head" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    code, err = cli_in_process(capsys, "distill", cfg_path, "--set", f"teacher.checkpoint={tmp_path / 'broken.pth'}")
    assert code == 2 and "broken.pth: does not match the configured model" in err

    result = run_cli("distill", cfg_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs/student_di"
    final = read_json(run_dir / "metrics.json")["final"]
    assert {"loss_det/classification", "loss_fi/N2N", "loss_di/N2N", "loss_fi/B2N", "loss_di/B2N",
            "mAP", "teacher_head_mAP", "teacher_head_probe_mAP"} <= final.keys()
    # The deployable weights are a plain student: no teacher, adapter or loss-module keys.
    weights = torch.load(run_dir / "model.pth", weights_only=True)
    student = build_detector(ModelConfig(detector="fcos", backbone="mobilenet_v2", width_mult=0.5, channels=32),
                             DataConfig(**DATA), {c: str(c) for c in range(6)})
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in student.state_dict().items()}
    resume = torch.load(run_dir / "resume.pth", weights_only=True)["model"]
    assert any(k.startswith("adapters.N2N.") for k in resume) and not any(k.startswith("teacher") for k in resume)

    # dist2 eval --teacher-head: the resume state brings the trained adapter and reproduces both logged numbers
    # under the same names; the bare student weights have no adapter: the probe only, under its own name.
    code, err = cli_in_process(capsys, "eval", cfg_path, "--checkpoint", run_dir / "resume.pth", "--teacher-head",
                               "--json", tmp_path / "th.json")
    assert code == 0, err
    metrics = read_json(tmp_path / "th.json")
    for key in ("mAP", "teacher_head_mAP", "teacher_head_probe_mAP"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-9), key
    code, err = cli_in_process(capsys, "eval", cfg_path, "--checkpoint", run_dir / "model.pth", "--teacher-head",
                               "--json", tmp_path / "probe.json")
    assert code == 0, err
    probe = read_json(tmp_path / "probe.json")
    assert "teacher_head_mAP" not in probe  # never the probe under the trained adapter's name
    assert probe["teacher_head_probe_mAP"] == pytest.approx(final["teacher_head_probe_mAP"], abs=1e-9)

    # dist2 predict --teacher-head draws the same thing, by the same rule: the trained adapter from resume.pth,
    # the probe from the bare weights.
    images = sorted((synth_root / "val").iterdir())[:2]
    for checkpoint, which in (("resume.pth", "teacher_head_mAP"), ("model.pth", "teacher_head_probe_mAP")):
        out = tmp_path / f"heads_{which}"
        args = ("predict", cfg_path, "--checkpoint", run_dir / checkpoint, "--images", *images, "--out", out,
                "--teacher-head")
        if which == "teacher_head_mAP":  # once as a user meets it: the installed command
            result = run_cli(*args)
            code, err = result.returncode, result.stderr
        else:
            code, err = cli_in_process(capsys, *args)
        assert code == 0, err
        assert f"drawing the teacher's head on the student's neck ({which})" in err
        assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in images)
        assert isinstance(read_json(out / "predictions.json"), list)


def test_distill_config_errors(tmp_path, synth_root):
    from dist2.config import load_config
    from dist2.errors import UserError

    teacher_yaml = write_config(tmp_path / "teacher.yaml", tiny_config(tmp_path, synth_root, name="teacher"))
    cfg_path = write_config(tmp_path / "d.yaml", distill_config(tmp_path, synth_root, teacher_yaml, "x.pth"))
    hint = load_config(cfg_path, ["distill.method=hint", "distill.strategies=[N2N]"]).distill
    assert (hint.method, hint.strategies) == ("fi", ["N2N"])  # Hint = FI (N2N): one experiment, one name in MLflow
    for override, message in [("distill.method=hint", r"the hint baseline \(Hint = FI at N2N\) is defined at N2N only"),
                              ("distill.strategies=[N2N, N2N]", "lists a strategy twice"),
                              ("distill.strategies=[X2Y]", "distill.strategies.0"),
                              ("distill.lambda_di=-1", "distill.lambda_di"),
                              ("distill.nonlocal.temperature=0", "distill.nonlocal.temperature")]:
        with pytest.raises(UserError, match=message):
            load_config(cfg_path, [override])
    result = run_cli("distill", write_config(tmp_path / "plain.yaml", tiny_config(tmp_path, synth_root)))
    assert result.returncode == 2 and "needs the teacher: and distill: sections" in result.stderr


def _terms(categories, images, targets, **distill):
    """The loss terms of one Distiller step, every random draw fixed (models, adapters), in eval mode."""
    teacher = _model(categories, "fcos", seed=1)
    student = _model(categories, "fcos", backbone="mobilenet_v2", width=0.5, seed=2)
    torch.manual_seed(3)
    distiller = Distiller(student, teacher, DistillConfig(**distill)).eval()
    with torch.no_grad():
        return {k: v.item() for k, v in distiller(images, targets).items()}


@pytest.mark.parametrize("lambda_di, lambda_feat", [(0.0, 1.0), (1.0, 0.0), (2.5, 1.0), (1.0, 2.5), (2.5, 0.0)])
def test_each_distillation_term_scales_with_its_own_lambda(data, lambda_di, lambda_feat):
    train, _, images, targets = data
    unit = _terms(train.categories, images, targets, method="dist2", strategies=["N2N", "B2N"])
    scaled = _terms(train.categories, images, targets, method="dist2", strategies=["N2N", "B2N"],
                    lambda_di=lambda_di, lambda_feat=lambda_feat)
    assert set(scaled) == set(unit)
    for name, value in unit.items():
        factor = lambda_di if name.startswith("loss_di/") else lambda_feat if name.startswith("loss_fi/") else 1.0
        assert scaled[name] == pytest.approx(factor * value, rel=1e-5, abs=1e-7), name
    assert all(unit[n] > 0 for n in unit if n.startswith(("loss_di/", "loss_fi/")))  # a λ had something to scale
    assert sum(scaled.values()) == pytest.approx(sum((lambda_di if n.startswith("loss_di/") else lambda_feat
                                                      if n.startswith("loss_fi/") else 1.0) * v
                                                     for n, v in unit.items()), rel=1e-5)


def test_b2n_runs_the_teachers_extra_block_on_the_injected_p5(data):
    """B2N replaces the teacher's P3-P5: its P6 and P7 come from the injected P5, so DI's gradient reaches the P5
    adapter through P6/P7 too (and P6/P7 are not the teacher's own)."""
    train, _, images, targets = data
    teacher = _model(train.categories, "fcos", seed=1)
    student = _model(train.categories, "fcos", backbone="mobilenet_v2", width=0.5, seed=2)
    distiller = Distiller(student, teacher, DistillConfig(method="di", strategies=["B2N"]))
    image_list, _, _ = student.preprocess(images, targets)
    injected = distiller.adapters["B2N"](student.backbone_stage(image_list.tensors))
    levels = distiller.teacher_rest("B2N", injected)
    assert len(levels) == 5 and all(a is b for a, b in zip(levels[:3], injected, strict=True))
    own = distiller.teacher_features(image_list.tensors)[1]
    assert not torch.allclose(levels[3], own[3])  # P6 from the injected P5, not the teacher's
    (levels[3].sum() + levels[4].sum()).backward()  # P6 and P7 alone
    grads = [conv.weight.grad for conv in distiller.adapters["B2N"].levels]
    assert grads[0] is None and grads[1] is None  # P3, P4 feed no extra level
    assert grads[2] is not None and grads[2].abs().sum() > 0  # P5's adapter: through the teacher's extra block


@pytest.mark.parametrize("log_var, used", [(0.7, 0.7), (-1.3, -1.3), (-9.0, -5.0), (8.0, 5.0)])
def test_pad_is_the_uncertainty_weighted_l2_with_a_clamped_log_variance(log_var, used):
    from dist2.config import PADConfig
    from dist2.distill.losses.pad import LOG_VAR_LIMIT

    assert LOG_VAR_LIMIT == 5.0
    torch.manual_seed(0)
    cfg = DistillConfig(method="pad", strategies=["N2N"], pad=PADConfig(weight=2.0))
    loss = LOSSES["pad"](cfg, [8] * 2, [16] * 2)
    for conv in loss.log_var:
        torch.nn.init.constant_(conv.bias, log_var)  # zero weights: log σ² = the bias everywhere
    student = [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    adapted = [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)]
    teacher = [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)]
    value = loss(Imitation("N2N", student, adapted, teacher, None))["loss_pad"]
    expected = 2.0 * sum(((t - a) ** 2 * torch.exp(torch.tensor(-used)) + used).mean()
                         for t, a in zip(teacher, adapted, strict=True)) / 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fi_is_one_mean_over_every_compared_element_of_the_strategy():
    """PAPER.md's 1/K: a P3-sized level with 64× the elements of a P6-sized one weighs 64× as much."""
    cfg = DistillConfig(method="fi", strategies=["N2N"], lambda_feat=1.0)
    loss = LOSSES["fi"](cfg, [4, 4], [4, 4])
    big, small = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 2, 2)
    diff_big, diff_small = torch.full_like(big, 1.0), torch.full_like(small, 3.0)
    value = loss(Imitation("N2N", [big, small], [big + diff_big, small + diff_small], [big, small], None))
    elements = big.numel() + small.numel()
    assert value["loss_fi/N2N"].item() == pytest.approx((big.numel() * 1.0 + small.numel() * 9.0) / elements)
    assert value["loss_fi/N2N"].item() != pytest.approx((1.0 + 9.0) / 2)  # not the mean of per-level MSEs


def test_nonlocal_masks_average_both_attentions_detached_and_follow_the_student():
    from dist2.distill.losses.nonlocal_kd import attention, attention_masks

    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 6, 6)
    student = torch.randn(2, 8, 6, 6, requires_grad=True)
    spatial, channel = attention_masks(student, teacher, 0.5)
    (s_sp, s_ch), (t_sp, t_ch) = attention(student, 0.5), attention(teacher, 0.5)
    torch.testing.assert_close(spatial, (s_sp + t_sp) / 2)
    torch.testing.assert_close(channel, (s_ch + t_ch) / 2)
    assert spatial.mean().item() == pytest.approx(1.0) and channel.mean().item() == pytest.approx(1.0)
    assert not spatial.requires_grad and not channel.requires_grad  # no gradient through the masks
    moved, _ = attention_masks(student * torch.linspace(0.1, 3.0, 6).view(1, 1, 1, 6), teacher, 0.5)
    assert (moved - spatial).abs().max() > 1e-3  # the student's features move the mask


@pytest.mark.parametrize("stride, inner", [(2, 4), (4, 2), (8, 2)])
def test_nonlocal_blocks_pool_keys_and_start_as_the_identity(stride, inner):
    from dist2.distill.losses.nonlocal_kd import NonLocalBlock

    block = NonLocalBlock(8, stride=stride)
    x = torch.randn(1, 8, 16, 24)
    torch.testing.assert_close(block(x), x)  # zero-initialised output: the identity at the start
    keys = block._pool(block.phi(x)).flatten(2)
    assert keys.shape[1:] == (inner, 16 * 24 // stride**2)  # (HW)² / stride² attention entries
    assert block._pool(torch.randn(1, 4, 1, 1)).shape[-1] == 1  # a 1x1 level is not pooled


def test_a_method_registered_in_one_line_is_accepted_run_expanded_and_reported(data, tmp_path, monkeypatch):
    """The vocabulary claim: a new method is one `METHODS` line. A toy method combining FI and PAD is validated
    by the config, built and run by the Distiller, expanded by an ablation grid (its λ_feat axis) and placed in
    the report after the registered methods."""
    import pandas as pd
    import yaml
    from pydantic import ValidationError

    from dist2.ablation.spec import SCHEMA, grid_runs, load_ablation, teacher_runs
    from dist2.methods import METHODS, Method
    from dist2.report import METRICS, RUN_COLUMNS, render

    from conftest import REPO

    monkeypatch.setitem(METHODS, "toy", Method(("fi", "pad"), "+ Toy", lambda_feat=True))
    assert DistillConfig(method="toy", strategies=["B2B"]).resolved_strategies == ["B2B"]
    with pytest.raises(ValidationError, match="unknown method 'nope'; choose one of: .*toy"):
        DistillConfig(method="nope")

    train, _, images, targets = data
    terms = _terms(train.categories, images, targets, method="toy", strategies=["B2B"])
    assert {name.split("/")[0] for name in terms if name.startswith("loss_")} >= {"loss_fi", "loss_pad"}

    ablation = tmp_path / "toy.yaml"
    ablation.write_text(yaml.safe_dump({
        "name": "toy", "output_dir": str(tmp_path / "runs"),
        "pairs": [{"teacher": str(REPO / "experiments/quick_fcos_teacher.yaml"),
                   "student": str(REPO / "experiments/quick_fcos_student.yaml")}],
        "grid": [{"method": ["toy"], "strategies": [["B2B"]], "lambda_feat": [0.5, 2.0], "seed": [0, 1]},
                 {"method": ["student"], "seed": [0, 1]}]}))
    spec = load_ablation(ablation)
    runs = grid_runs(spec, ablation, teacher_runs(spec, ablation))
    toy = [r for r in runs if r.params["method"] == "toy"]
    assert sorted((r.params["lambda_feat"], r.params["lambda_di"], r.params["seed"]) for r in toy) == [
        ("0.5", "", "0"), ("0.5", "", "1"), ("2.0", "", "0"), ("2.0", "", "1")]
    assert {r.cfg.distill.method for r in toy} == {"toy"} and {r.cfg.distill.lambda_feat for r in toy} == {0.5, 2.0}

    # The report of these runs (their MLflow params, a made-up mAP each): the toy at λ_feat = 1 is Table 1's row.
    finished = [{**{k: r.params.get(k, "") for k in SCHEMA}, "mAP": 20.0 + i} for i, r in enumerate(runs)]
    finished += [{**finished[0], "lambda_feat": "1.0", "seed": str(s), "mAP": m} for s, m in ((0, 30.0), (1, 31.0))]
    frame = pd.DataFrame(finished).reindex(columns=[*SCHEMA, *METRICS, *RUN_COLUMNS])  # as load_runs returns it
    text = render(frame, ["table1", "lambda_di"], tmp_path, ["toy"])
    rows = [line for line in text.split("## Table 1", 1)[1].splitlines() if line.startswith("|")]
    toy_row = next(line for line in rows if "+ Toy" in line)
    # λ_feat = 1: 30 and 31 against the student's 24 and 25 (its seeds' made-up mAPs)
    assert [cell.strip() for cell in toy_row.strip("|").split("|")][2:7] == ["+ Toy", "B2B", "30.5 ± 0.7", "+6.0 ✓",
                                                                            "2"]
    assert rows.index(toy_row) > max(i for i, line in enumerate(rows) if "+ Dist2" in line)  # after the registered
