"""MedSeqFT: the distillation stages' parameter routing, LoRA-based KD and merge, buffers, the stream runner."""
import copy
import json

import numpy as np
import pytest
import torch

from medadapt.cli import main
from medadapt.models.parts import encoder_features, encoder_parameters
from medadapt.tuning.base import StepContext
from medadapt.tuning.distill import EncoderLoRADistillation, FeatureDistillation, KDFineTuning, frozen_copy


class FixedSampler:
    """A stand-in sampler: the same image batch every time (the routing test needs known inputs)."""

    def __init__(self, image):
        self.image = image

    def sample(self, rng):
        return {"image": self.image.clone()}


def _seg_loss(model, batch, outputs):
    out = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    return (out ** 2).mean()


def test_kd_fft_updates_each_parameter_with_its_own_loss(tiny_unet):
    """Segmentation loss -> every parameter; distillation loss -> the encoder only; both at the same weights."""
    torch.manual_seed(0)
    model = tiny_unet(seed=1)
    teacher = frozen_copy(tiny_unet(seed=2))  # a different encoder, so the distillation gradient is not zero
    teacher_before = copy.deepcopy(teacher.state_dict())
    task_image = torch.randn(2, 1, 16, 32, 32)
    buffer_image = torch.randn(2, 1, 16, 32, 32)
    lr = 0.1
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the expected update, by hand: plain SGD, so each step moves a weight by -lr * its gradient
    ref = copy.deepcopy(model)
    g_seg = torch.autograd.grad(_seg_loss(ref, None, ref(task_image)), list(ref.parameters()), allow_unused=True)
    g_seg = [torch.zeros_like(p) if g is None else g for p, g in zip(ref.parameters(), g_seg)]
    enc_ids = {id(p) for p in encoder_parameters(ref)}
    enc_params = [p for p in ref.parameters() if id(p) in enc_ids]
    g_kd = torch.autograd.grad(FeatureDistillation(teacher)(ref, {"image": buffer_image}), enc_params)
    kd_by_id = {id(p): g for p, g in zip(enc_params, g_kd)}
    expected = {}
    for (name, p), g in zip(ref.named_parameters(), g_seg):
        expected[name] = w0[name] - lr * g - lr * kd_by_id.get(id(p), torch.zeros_like(g))
    assert any(kd_by_id[id(p)].abs().max() > 0 for p in enc_params)

    strategy = KDFineTuning(teacher, FixedSampler(buffer_image), seed=0)
    model = strategy.prepare(model)
    opt = torch.optim.SGD(strategy.parameters(model), lr=lr)
    strategy.attach(opt)
    ctx = StepContext(model=model, forward=model, optimizer=opt, loss=_seg_loss)
    strategy.train_step(ctx, {"image": task_image})
    enc_names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in encoder_parameters(model)}}
    assert enc_names and len(enc_names) < len(expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the decoder and head moved by the segmentation gradient alone: no distillation term reached them
    for name in set(expected) - enc_names:
        torch.testing.assert_close(model.get_parameter(name).detach(), w0[name] - lr * dict(
            zip([n for n, _ in ref.named_parameters()], g_seg))[name], rtol=1e-5, atol=1e-6)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    # the distillation optimiser takes no weight decay (the encoder is not decayed twice per step)
    assert strategy.kd_optimizer.defaults.get("weight_decay", 0) == 0
    state = strategy.state_dict()
    assert state["step"] == 1 and state["kd_optimizer"] is not None


def test_lora_kd_leaves_both_encoders_and_merges_exactly(tiny_unet, tmp_path):
    from medadapt.engine import Trainer, TrainingConfig
    from medadapt.models.lora import lora_modules

    previous = tiny_unet(seed=1)  # E_{t-1}
    mid = frozen_copy(tiny_unet(seed=2))  # E_{t-mid}, the fine-tuned encoder
    prev_state = copy.deepcopy(previous.state_dict())
    mid_state = copy.deepcopy(mid.state_dict())
    student = copy.deepcopy(previous)
    kd = EncoderLoRADistillation(rank=2)
    torch.manual_seed(0)
    student = kd.prepare(student)
    assert lora_modules(student) and all(
        any(m is e for e in student.encoder.modules()) for m in lora_modules(student))
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert trainable and trainable <= {id(p) for p in kd.parameters(student)}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 16, 32, 32, generator=g)

    class Sampler:
        def sample(self, rng):
            return {"image": images + 0.1 * torch.from_numpy(rng.standard_normal(images.shape).astype("float32"))}

    config = TrainingConfig(epochs=2, iterations_per_epoch=3, initial_lr=1e-2, grad_clip=None,
                            optimizer={"name": "adamw", "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
                            schedule={"name": "constant"}, loss={"name": "encoder-feature-mse"})
    term = FeatureDistillation(mid)
    with torch.no_grad():
        before = float(term(student, {"image": images}))
    Trainer(student, kd, Sampler(), config, tmp_path / "kd", loss=term, progress=False).fit()
    with torch.no_grad():
        after = float(term(student, {"image": images}))
    assert after < before  # the LoRA factors learnt to move E_{t-1} towards E_{t-mid}
    for k, v in mid.state_dict().items():
        assert torch.equal(v, mid_state[k]), k
    for k, v in previous.state_dict().items():  # the model folder's E_{t-1} itself
        assert torch.equal(v, prev_state[k]), k
    for name, p in student.named_parameters():  # the copy's base weights stay E_{t-1}'s too
        if name.endswith("parametrizations.weight.original"):
            key = name.replace(".parametrizations.weight.original", ".weight")
            assert torch.equal(p.detach(), prev_state[key]), key
    student.eval()
    with torch.no_grad():
        unmerged = [f.clone() for f in encoder_features(student, images)]
        out_unmerged = student(images)[0].clone()
    merged = kd.finalize(student)
    assert not lora_modules(merged)
    assert set(merged.state_dict()) == set(prev_state)  # the plain architecture back
    with torch.no_grad():
        for a, b in zip(unmerged, encoder_features(merged, images)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(images)[0], out_unmerged, rtol=1e-5, atol=1e-5)


class FakePretext:
    """A pretext model whose loss of a tile is the tile's mean intensity plus masking noise: a known ranking."""

    def sample_losses(self, images, generator):
        noise = torch.rand(images.shape[0], generator=generator) * 1e-3
        return images.mean(dim=(1, 2, 3, 4)) + noise


class FakeCase:
    def __init__(self, case_id, level, shape=(12, 20, 20)):
        self.case_id = case_id
        self.data = np.full((1, *shape), level, dtype=np.float32)
        self.channel_min = [level]


def test_kd_recipe_by_the_papers_ratios():
    from medadapt.engine.recipe import load_recipe
    from medadapt.workflows.seqft import kd_recipe_from

    kd = kd_recipe_from(load_recipe("medseqft-paper"))
    assert (kd.epochs, kd.iterations_per_epoch, kd.lr) == (20, 250, pytest.approx(3e-5))  # 5,000 its at 3e-5
    assert kd.schedule["warmup_epochs"] == 1 and kd.optimizer == load_recipe("medseqft-paper").optimizer
    short = load_recipe("medseqft-paper").with_overrides(epochs=5)
    assert kd_recipe_from(short).epochs == 1 and kd_recipe_from(short).schedule["warmup_epochs"] == 0


def test_encoder_change_and_backward_transfer(tiny_unet):
    from medadapt.sequential.transfer import backward_transfer, encoder_change

    a, b = tiny_unet(seed=0), tiny_unet(seed=0)
    with torch.no_grad():
        first = next(m for m in b.encoder.modules() if isinstance(m, torch.nn.Conv3d))
        first.weight.add_(0.5)
    rows = encoder_change(a, b)
    n_params = first.weight.numel() + (first.bias.numel() if first.bias is not None else 0)
    assert rows[0][1] == pytest.approx(0.5 * first.weight.numel() / n_params)
    assert all(v == 0 for _, v in rows[1:])
    assert backward_transfer([80.0, 60.0], [70.0, 65.0]) == pytest.approx(-2.5)
    assert backward_transfer([], []) is None


def test_mds_picks_the_lowest_pretext_losses():
    from medadapt.sequential.buffer import lowest, mds_scores, random_pick, tile_starts

    levels = {"a": 3.0, "b": -1.0, "c": 0.5, "d": 2.0, "e": -0.2}
    cases = [FakeCase(c, v) for c, v in levels.items()]
    scores = mds_scores(FakePretext(), cases, "task", (8, 16, 16), repeats=5, seed=0, progress=False)
    assert lowest(scores, 2) == ["b", "e"]
    assert lowest(scores, 3) == ["b", "e", "c"]
    for c, v in levels.items():
        assert scores[c] == pytest.approx(v, abs=2e-3)
    again = mds_scores(FakePretext(), list(reversed(cases)), "task", (8, 16, 16), repeats=5, seed=0, progress=False)
    assert again == scores  # reproducible, whatever order the cases come in
    # tiles cover the volume; a short axis gets one centred tile
    assert tile_starts((12, 20, 5), (8, 16, 8)) == [(0, 0, -2), (0, 4, -2), (4, 0, -2), (4, 4, -2)]
    pick = random_pick(list(levels), 2, seed=0, task_index=1)
    assert len(pick) == 2 and pick == random_pick(list(levels), 2, seed=0, task_index=1)


class PerSamplePretext:
    """Like the real pretext model, one masking draw per sample, in order: a loss of mean intensity + noise."""

    def sample_losses(self, images, generator):
        noise = torch.cat([torch.rand(1, generator=generator) for _ in range(images.shape[0])])
        return images.mean(dim=(1, 2, 3, 4)) + 0.05 * noise


def test_batched_mds_scoring_draws_what_one_masking_at_a_time_draws():
    """Many maskings share one forward pass; the draws (and so the scores) do not depend on the batch, and
    the first R maskings of a run at R' > R are exactly the run at R."""
    from medadapt.sequential.buffer import case_tiles, mds_losses, mds_scores
    from medadapt.utils import seeds

    cases = [FakeCase(c, v, shape=(12, 40, 20)) for c, v in {"a": 0.3, "b": 0.1, "c": 0.2}.items()]
    patch = (8, 16, 16)
    n_tiles = len(case_tiles(cases[0], patch))
    assert n_tiles > 1
    runs = [mds_losses(PerSamplePretext(), cases, "t", patch, 7, seed=3, batch=b, progress=False)
            for b in (1, 3, n_tiles, 64)]
    for other in runs[1:]:
        for c in runs[0]:
            np.testing.assert_allclose(other[c], runs[0][c], rtol=0, atol=1e-12)
    # by hand: masking r of case c is the mean over its tiles of the draws r*n .. r*n+n-1 of c's own stream
    g = seeds.torch_generator(3, "mds", "t/b")
    draws = torch.cat([torch.rand(1, generator=g) for _ in range(7 * n_tiles)])
    expected = 0.1 + 0.05 * draws.double().view(7, n_tiles).mean(dim=1)
    np.testing.assert_allclose(runs[0]["b"], expected.numpy(), rtol=1e-6)
    short = mds_losses(PerSamplePretext(), cases, "t", patch, 3, seed=3, progress=False)
    for c in short:
        np.testing.assert_allclose(short[c], runs[0][c][:3], rtol=0, atol=1e-12)
    scores = mds_scores(PerSamplePretext(), cases, "t", patch, 7, seed=3, progress=False)
    assert scores == pytest.approx({c: float(v.mean()) for c, v in runs[0].items()})


def test_buffer_stability_finds_where_the_buffer_stops_changing():
    from medadapt.sequential.buffer import buffer_stability, settled_repeats

    rng = np.random.default_rng(0)
    # five cases, means 0..4, unit noise: the 2 lowest (c0, c1) win once enough maskings are averaged
    losses = {f"c{i}": i + rng.standard_normal(256) * 3.0 for i in range(5)}
    rows = buffer_stability(losses, 2)
    assert [r["repeats"] for r in rows] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert set(rows[-1]["buffer"]) == {"c0", "c1"} and rows[-1]["shared_with_final"] == 2 and rows[-1]["settled"]
    r_star = settled_repeats(rows)
    assert r_star is not None and all(r["settled"] for r in rows if r["repeats"] >= r_star)
    assert all(set(r["buffer"]) == {"c0", "c1"} for r in rows if r["repeats"] >= r_star)
    before = [r for r in rows if r["repeats"] < r_star]
    assert before and not before[-1]["settled"]
    # a buffer that changes at the last R measured has not settled within the measurement
    flip = {"a": np.array([0.0, 0.0, 0.0, 9.0]), "b": np.array([1.0, 1.0, 1.0, 1.0])}
    assert settled_repeats(buffer_stability(flip, 1)) is None


def _stream(world, tmp_path, tasks=("tgt", "src")):
    f = tmp_path / f"stream-{len(tasks)}.yaml"
    f.write_text("name: tiny\ntasks:\n" + "".join(f"  - data: {world[t]}\n" for t in tasks))
    return f


SEQ = ["--method", "seq-ft", "--buffer", "random", "--retention", "lora-kd", "--buffer-size", "2",
       "--epochs", "2", "--iterations-per-epoch", "2", "--kd-max-epochs", "12", "--recipe", "cpu-finetune", "--quiet"]


@pytest.fixture(scope="module")
def seq_run(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq")
    out = tmp / "run"
    assert main(["seqft", str(_stream(world, tmp)), "--model", str(world["fm"]), "--out", str(out), *SEQ]) == 0
    return out


def test_two_task_stream_end_to_end(world, seq_run):
    from medadapt.models import load_model_folder
    from medadapt.workflows.seqft import KD_LR_FRACTION

    out = seq_run
    results = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["tgt", "src"]
    buffer = json.loads((out / "buffer.json").read_text())
    # after the stream's last task no task is left for a buffer to serve: it is not selected (until a longer
    # stream continues the run)
    assert [e["task"] for e in buffer["entries"]] == ["tgt", "tgt"]
    m1 = load_model_folder(out / "tasks" / "01-tgt" / "refined" / "model")
    m2 = load_model_folder(out / "tasks" / "02-src" / "refined" / "model")
    fm = load_model_folder(world["fm"])
    assert m1.labels == json.loads((world["tgt"] / "dataset.json").read_text())["labels"]
    n1, n2, n0 = m1.load_network(), m2.load_network(), fm.load_network()
    # each task's refined encoder moved away from the previous one (fine-tuned, distilled, merged)
    e0, e1, e2 = (dict(n.encoder.named_parameters()) for n in (n0, n1, n2))
    assert any(not torch.equal(e1[k], e0[k]) for k in e0)
    assert any(not torch.equal(e2[k], e1[k]) for k in e1)
    # M_t = the merged encoder + the task model M_{t-mid}'s decoder and head; the task is scored with M_{t-mid}
    mid = load_model_folder(out / "tasks" / "02-src" / "model").load_network()
    for (k, a), (_, b) in zip(mid.decoder.stages.named_parameters(), n2.decoder.stages.named_parameters()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(mid.encoder.state_dict()[k], v) for k, v in n2.encoder.state_dict().items())
    task2 = json.loads((out / "tasks" / "02-src" / "task.json").read_text())
    assert task2["carried_model"] == "refined/model"
    assert task2["metrics"] == json.loads((out / "tasks" / "02-src" / "summary.json").read_text())
    assert task2["refined_metrics"] == json.loads((out / "tasks" / "02-src" / "refined" / "summary.json").read_text())
    # task 2 started from task 1's refined model (its encoder), with a fresh head
    stage1 = torch.load(out / "tasks" / "02-src" / "stage1" / "training" / "checkpoint_latest.pt",
                        weights_only=False)
    assert stage1["epoch_done"] == 2
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("index,task,dsc,nsd,hd95,dsc_refined") and len(rows) == 3
    assert set(task2["seconds"]) == {"stage1", "stage2"} and task2["buffer_pending"]
    task1 = json.loads((out / "tasks" / "01-tgt" / "task.json").read_text())
    assert set(task1["seconds"]) == {"stage1", "stage2", "buffer"} and "buffer_pending" not in task1
    # the LoRA-based KD ran its whole schedule (the default, ceiling: --kd-max-epochs 12) at the fine-tuning's lr
    kd = task2["refinement"]
    history = json.loads((out / "tasks" / "02-src" / "stage2" / "training" / "history.json").read_text())
    assert kd["ceiling_epochs"] == 12 and kd["curve"] == history["epoch_loss"] and kd["epochs"] == len(kd["curve"])
    assert kd["iterations"] == 2 * kd["epochs"] and history["lr"] == [history["lr"][0]] * kd["epochs"]  # constant
    assert history["lr"][0] == pytest.approx(KD_LR_FRACTION * json.loads((out / "seqft.json").read_text())
                                             ["training"]["initial_lr"])
    assert kd["stopped_at"] is None and kd["epochs"] == 12
    # forgetting: task 1's decoder and head on the final encoder, and the per-layer encoder change (Fig. 4)
    transfer = json.loads((out / "transfer.json").read_text())
    assert transfer["after_task"] == 2 and [r["task"] for r in transfer["tasks"]] == ["tgt"]
    r = transfer["tasks"][0]
    assert r["dsc_just_after"] == pytest.approx(100 * results["tasks"][0]["metrics"]["foreground_mean"]["dsc"])
    assert transfer["bwt"] == pytest.approx(r["dsc_after_stream"] - r["dsc_just_after"])
    assert (out / "transfer" / "after-02" / "01-tgt" / "summary.json").is_file()
    change = (out / "encoder_change.csv").read_text().splitlines()
    assert change[0] == "layer,index,mean_abs_change" and len(change) > 3
    assert all(float(line.split(",")[2]) >= 0 for line in change[1:])
    assert (out / "encoder_change.png").stat().st_size > 1000


def test_killed_task_resumes_and_a_stream_extends(world, seq_run, tmp_path, monkeypatch, capsys):
    import medadapt.workflows.seqft as seqft_mod

    out = tmp_path / "run"
    one = _stream(world, tmp_path, ("tgt",))
    assert main(["seqft", str(one), "--model", str(world["fm"]), "--out", str(out), *SEQ]) == 0
    alone = json.loads((out / "tasks" / "01-tgt" / "task.json").read_text())
    assert alone["buffer_pending"] and [e["task"] for e in alone["buffer_after"]] == []  # the stream's last task
    # a longer stream: refused without --resume, then task 2 is killed during its evaluation
    two = _stream(world, tmp_path)
    assert main(["seqft", str(two), "--model", str(world["fm"]), "--out", str(out), *SEQ]) == 2
    assert "--resume" in capsys.readouterr().err
    real = seqft_mod.predict_and_evaluate
    monkeypatch.setattr(seqft_mod, "predict_and_evaluate",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        settings = seqft_mod.resolve_seqft(seqft_mod.SeqftRequest(
            two, world["fm"], "seq-ft", buffer="random", retention="lora-kd", buffer_size=2, epochs=2,
            iterations_per_epoch=2, kd_max_epochs=12, recipe="cpu-finetune"))
        seqft_mod.seqft(settings, out, resume=True, progress=False)
    assert not (out / "tasks" / "02-src" / "task.json").exists()
    monkeypatch.setattr(seqft_mod, "predict_and_evaluate", real)
    assert main(["seqft", str(two), "--model", str(world["fm"]), "--out", str(out), *SEQ, "--resume"]) == 0
    # task 1 was not recomputed: only the buffer it left unselected was selected, as the two-task run did
    task1 = json.loads((out / "tasks" / "01-tgt" / "task.json").read_text())
    whole = json.loads((seq_run / "tasks" / "01-tgt" / "task.json").read_text())
    assert {k: v for k, v in task1.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    assert task1["seconds"]["stage1"] == alone["seconds"]["stage1"] and "buffer" in task1["seconds"]
    # the resumed run ends where the uninterrupted one did, bit for bit
    for sub in ("model", "refined/model"):
        a = torch.load(out / "tasks" / "02-src" / sub / "weights.pt")
        b = torch.load(seq_run / "tasks" / "02-src" / sub / "weights.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other settings into the same folder: one line naming the difference
    assert main(["seqft", str(two), "--model", str(world["fm"]), "--out", str(out), *SEQ[:-1], "--seed", "1",
                 "--quiet", "--resume"]) == 2
    assert "seed" in capsys.readouterr().err
    # a stream that changes a finished task is not an extension
    swapped = _stream(world, tmp_path, ("src", "tgt"))
    assert main(["seqft", str(swapped), "--model", str(world["fm"]), "--out", str(out), *SEQ, "--resume"]) == 2
    assert "task 1" in capsys.readouterr().err


def test_a_streams_first_task_trains_as_finetune_does(world, tmp_path):
    """One way to build a run's training: with FSEFT's recipe (its intensity-shift augmentation and 1:1 crops,
    PyTorch's head initialisation, no deep supervision, full fine-tuning's own lr and patches per case, an epoch
    of ``cases``), a seq-ft stream's first task (full fine-tuning from M_0) and ``finetune --method full`` train
    bit-identical weights for one seed and one case."""
    from importlib import resources

    import yaml

    recipe = yaml.safe_load((resources.files("medadapt.engine") / "recipes" / "fseft-paper.yaml").read_text())
    recipe.update(name="fseft-paper-tiny", patch_size=[16, 32, 32])  # the tiny network's patch, not 96^3
    (tmp_path / "fseft-tiny.yaml").write_text(yaml.safe_dump(recipe))
    common = ["--model", str(world["fm"]), "--recipe", str(tmp_path / "fseft-tiny.yaml"), "--shots", "1", "--seed",
              "3", "--epochs", "2", "--quiet"]
    seq, fine = tmp_path / "seq", tmp_path / "fine"
    assert main(["seqft", str(_stream(world, tmp_path, ("tgt",))), "--out", str(seq), "--method", "seq-ft",
                 *common]) == 0
    assert main(["finetune", "--data", str(world["tgt"]), "--out", str(fine), "--method", "full", *common]) == 0
    a = torch.load(seq / "tasks" / "01-tgt" / "model" / "weights.pt")
    b = torch.load(fine / "model" / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the weights moved from the foundation's: the comparison is of trained networks
    run = json.loads((fine / "run.json").read_text())
    assert run["training"]["initial_lr"] == 1e-4 and run["recipe"]["patches_per_case"] == 3
    history = json.loads((seq / "tasks" / "01-tgt" / "stage1" / "training" / "history.json").read_text())
    assert history["lr"] == json.loads((fine / "training" / "history.json").read_text())["lr"]
    assert len(history["iteration_loss"]) == 2  # one case, two cases per step: one iteration per epoch


def test_parallel_baseline_runs_finetune_per_task(world, tmp_path):
    out = tmp_path / "fft"
    assert main(["seqft", str(_stream(world, tmp_path)), "--model", str(world["fm"]), "--out", str(out),
                 "--method", "full", "--epochs", "1", "--iterations-per-epoch", "2", "--recipe", "cpu-finetune",
                 "--quiet"]) == 0
    for name in ("01-tgt", "02-src"):
        run = json.loads((out / "tasks" / name / "run.json").read_text())
        assert run["method"]["name"] == "full" and run["head"] == "fresh"
        assert run["foundation"] == str(world["fm"].resolve())  # every task from M0
    assert len((out / "results.csv").read_text().splitlines()) == 3


def test_joint_training_shares_the_network_and_keeps_a_head_per_task(world, tmp_path, tiny_unet):
    from medadapt.models.multihead import TaskHeads
    from medadapt.models.parts import model_parts

    a, b = tiny_unet(seed=0, num_classes=2), tiny_unet(seed=1, num_classes=3)
    model = TaskHeads(a, [model_parts(a).heads, model_parts(b).heads])
    x = torch.randn(1, 1, 16, 32, 32)
    model.activate(1)
    assert model(x)[0].shape[1] == 3
    model.activate(0)
    assert model(x)[0].shape[1] == 2
    # the state dict holds every task's heads once, whichever task is active; a copy restores exactly
    keys = set(model.state_dict())
    assert sum(k.startswith("task_heads.1.") for k in keys) == sum(1 for _ in b.decoder.seg_layers.state_dict())
    twin = copy.deepcopy(model)
    twin.activate(1)
    torch.testing.assert_close(twin(x)[0], (model.activate(1), model(x))[1][0])
    plain = model.task_network(1)
    assert set(plain.state_dict()) == set(b.state_dict())
    torch.testing.assert_close(plain(x)[0], model(x)[0])

    out = tmp_path / "joint"
    assert main(["seqft", str(_stream(world, tmp_path)), "--model", str(world["fm"]), "--out", str(out),
                 "--method", "joint", "--epochs", "1", "--iterations-per-epoch", "3", "--recipe", "cpu-finetune",
                 "--quiet"]) == 0
    history = json.loads((out / "joint" / "training" / "history.json").read_text())
    assert len(history["iteration_loss"]) == 2 * 3  # n tasks x the recipe's budget
    from medadapt.models import load_model_folder

    n1 = load_model_folder(out / "tasks" / "01-tgt" / "model").load_network()
    n2 = load_model_folder(out / "tasks" / "02-src" / "model").load_network()
    assert all(torch.equal(v, n2.encoder.state_dict()[k]) for k, v in n1.encoder.state_dict().items())


@pytest.fixture(scope="module")
def mae_foundation(world):
    """A cpu-tiny MAE foundation (its network is its pretext network) on the source cohort."""
    fm = world["root"] / "mae-fm-seqft"
    if not (fm / "plans.json").is_file():
        assert main(["pretrain", "--data", str(world["src"]), "--out", str(fm), "--preset", "cpu-tiny",
                     "--objective", "mae", "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"]) == 0
    return fm


def test_medseqft_with_an_mae_foundation(world, mae_foundation, tmp_path, capsys):
    """The whole method: MDS buffers scored by the foundation's pretext loss, KD-based FFT, LoRA-KD, merge."""
    fm = mae_foundation
    out = tmp_path / "medseqft"
    assert main(["seqft", str(_stream(world, tmp_path)), "--model", str(fm), "--out", str(out), "--method", "medseqft",
                 "--buffer-size", "2", "--mds-repeats", "3", "--epochs", "2", "--iterations-per-epoch", "2",
                 "--kd-max-epochs", "10", "--recipe", "cpu-finetune", "--quiet"]) == 0
    mds = json.loads((out / "tasks" / "01-tgt" / "mds.json").read_text())
    assert mds["repeats"] == 3 and len(mds["scores"]) == 8  # every training case of the task scored
    assert mds["picked"] == sorted(mds["scores"], key=lambda c: (mds["scores"][c], c))[:2]
    # each case's loss per masking, and the buffer of the first r maskings (r = 1, 2, 3) ending in the chosen one
    assert all(len(v) == 3 and abs(sum(v) / 3 - mds["scores"][c]) < 1e-9 for c, v in mds["losses"].items())
    assert [r["repeats"] for r in mds["stability"]] == [1, 2, 3]
    assert mds["stability"][-1]["buffer"] == mds["picked"] and mds["stability"][-1]["settled"]
    assert mds["settled_repeats"] in (None, 1, 2)
    buffer = json.loads((out / "buffer.json").read_text())
    assert buffer["selection"] == "mds" and buffer["repeats"] == 3 and buffer["size_per_task"] == 2
    assert [e["case"] for e in buffer["entries"][:2]] == mds["picked"]
    assert all(e["score"] == mds["scores"][e["case"]] for e in buffer["entries"][:2])
    seqft_id = json.loads((out / "seqft.json").read_text())
    assert (seqft_id["buffer"], seqft_id["retention"], seqft_id["kd_rank"]) == ("mds", "lora-kd", 2)
    # the losses are kept once per (M_0, cases, R, seed) in the cache, for any other run of this stream
    from medadapt.workflows.common import cache_root
    stored = [json.loads(f.read_text()) for f in (cache_root() / "mds").glob("*.json")]
    assert any(r["task"] == "tgt" and r["losses"] == mds["losses"] for r in stored)
    task2 = json.loads((out / "tasks" / "02-src" / "task.json").read_text())
    assert task2["seconds"]["stage1"] > 0 and task2["seconds"]["stage2"] > 0
    # a foundation without a pretext head cannot score cases: one line naming the fix
    err = _err(capsys, ["seqft", str(_stream(world, tmp_path)), "--model", str(world["fm"]), "--out",
                        str(tmp_path / "x"), "--method", "medseqft", "--quiet"])
    assert "pretrain-ssl-head" in err
    assert not (tmp_path / "x").exists()
    # a ceiling the convergence check cannot decide within, a rank no encoder layer of the foundation holds
    stream = str(_stream(world, tmp_path))
    for extra, message in ((["--kd-max-epochs", "5"], "at least 10 epochs"),
                           (["--kd-rank", "100000"], "rank is at most"),
                           (["--kd-until", "budget", "--kd-max-epochs", "20"], "only with --kd-until levelled")):
        err = _err(capsys, ["seqft", stream, "--model", str(fm), "--out", str(tmp_path / "y"), "--method",
                            "medseqft", "--epochs", "2", "--quiet", *extra])
        assert message in err, err
        assert not (tmp_path / "y").exists()


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs(world, tmp_path, capsys):
    fm, stream = str(world["fm"]), str(_stream(world, tmp_path))
    run = ["--model", fm, "--out", str(tmp_path / "r"), "--quiet"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "empty.yaml" in _err(capsys, ["seqft", str(empty), *run])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed\n")
    assert "not readable YAML" in _err(capsys, ["seqft", str(bad), *run])
    assert "no such stream file" in _err(capsys, ["seqft", str(tmp_path / "missing.yaml"), *run])
    nolabels = tmp_path / "nolabels"
    nolabels.mkdir()
    (nolabels / "imagesTr").mkdir()
    (nolabels / "labelsTr").mkdir()
    meta = json.loads((world["tgt"] / "dataset.json").read_text())
    (nolabels / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0}, "numTraining": 0}))
    f = tmp_path / "nolabels.yaml"
    f.write_text(f"tasks:\n  - data: {nolabels}\n")
    err = _err(capsys, ["seqft", str(f), *run])
    assert "tasks[0]" in err
    (nolabels / "dataset.json").write_text(json.dumps({**meta, "numTraining": 0}))  # labels, but no cases
    err = _err(capsys, ["seqft", str(f), *run])
    assert "tasks[0]" in err and "no training images" in err
    assert "--buffer-size 50" in _err(capsys, ["seqft", stream, *run, "--method", "seq-ft", "--buffer", "random",
                                               "--buffer-size", "50"])
    assert "--buffer/--retention" in _err(capsys, ["seqft", stream, *run, "--method", "full", "--buffer", "mds"])
    assert "--method 'nope'" in _err(capsys, ["seqft", stream, *run, "--method", "nope"])
    assert "--shots 40" in _err(capsys, ["seqft", stream, *run, "--method", "seq-ft", "--shots", "40"])
    assert not (tmp_path / "r").exists()  # nothing written for a refused run


def test_mds_losses_are_computed_once_per_input(mae_foundation, tmp_path, monkeypatch):
    """Runs that share M_0, a task's cases, R and the seed share its MDS losses: the second reads exactly what the
    first computed, and the seconds that took; any other input (seed, R, task, a voxel, the foundation's
    weights) is computed anew, and so is an unreadable file."""
    import medadapt.sequential.mds_store as store_module
    from medadapt.sequential.buffer import mds_losses
    from medadapt.ssl import load_pretext

    pretext = load_pretext(mae_foundation)
    patch = pretext.patch_size
    cases = [FakeCase(c, v, shape=tuple(patch)) for c, v in {"a": 0.3, "b": -0.2, "c": 0.1}.items()]
    store = tmp_path / "mds"
    first, seconds = store_module.stored_mds_losses(pretext, cases, "t", patch, 3, 0, store, progress=False)
    fresh = mds_losses(pretext, cases, "t", patch, 3, seed=0, progress=False)
    assert all(np.array_equal(first[c], fresh[c]) for c in fresh) and seconds > 0
    calls = []
    real = store_module.mds_losses
    monkeypatch.setattr(store_module, "mds_losses", lambda *a, **k: calls.append(a) or real(*a, **k))
    again, seconds_again = store_module.stored_mds_losses(pretext, cases, "t", patch, 3, 0, store, progress=False)
    assert calls == [] and seconds_again == seconds
    assert all(again[c].dtype == np.float64 and np.array_equal(again[c], first[c]) for c in first)
    changed = [FakeCase("a", 0.3, shape=tuple(patch)), *cases[1:]]
    changed[0].data[0, 0, 0, 0] += 1.0
    other_weights = load_pretext(mae_foundation)
    with torch.no_grad():
        next(other_weights.network.parameters()).add_(1e-3)
    for args in [(pretext, cases, "t", patch, 3, 1), (pretext, cases, "t", patch, 2, 0),
                 (pretext, cases, "u", patch, 3, 0), (pretext, changed, "t", patch, 3, 0),
                 (other_weights, cases, "t", patch, 3, 0)]:
        store_module.stored_mds_losses(*args, store, progress=False)
    assert len(calls) == 5 and len(list(store.glob("*.json"))) == 6
    for f in store.glob("*.json"):  # a truncated file is computed again, not read
        f.write_text(f.read_text()[:20])
    store_module.stored_mds_losses(pretext, cases, "t", patch, 3, 0, store, progress=False)
    assert len(calls) == 6


def test_mds_stability_command(world, mae_foundation, tmp_path, capsys):
    fm = mae_foundation
    out = tmp_path / "stab"
    assert main(["mds-stability", "--model", str(fm), "--data", str(world["tgt"]), "--out", str(out),
                 "--repeats", "4", "--buffer-size", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Buffer settled at R" in printed and ("settles by R" in printed or "had not settled" in printed)
    record = json.loads((out / "stability.json").read_text())
    task = record["tasks"][0]
    assert [r["repeats"] for r in task["rows"]] == [1, 2, 4] and task["cases"] == 8
    assert task["rows"][-1]["shared_with_final"] == 2 and task["rows"][-1]["settled"]
    # the buffer at R = 4 is what MDS itself picks at R = 4
    from medadapt.sequential.buffer import lowest

    assert sorted(task["rows"][-1]["buffer"]) == sorted(lowest(task["scores"], 2))
    assert (out / "stability.png").stat().st_size > 1000 and (out / "stability.csv").read_text().count("\n") == 4
    for argv, message in ((["--repeats", "1"], "at least 2"), (["--buffer-size", "50"], "--buffer-size 50")):
        err = _err(capsys, ["mds-stability", "--model", str(fm), "--data", str(world["tgt"]), "--out",
                            str(tmp_path / "bad"), "--quiet", *argv])
        assert message in err
    assert not (tmp_path / "bad").exists()
    err = _err(capsys, ["mds-stability", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--out",
                        str(tmp_path / "bad"), "--quiet"])
    assert "pretrain-ssl-head" in err


# ------------------------------------------------------------------- issue 43: the readings kept as options

def _kd_step(model, strategy, task_image, lr=0.1, optimizer="sgd"):
    model = strategy.prepare(model)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(strategy.parameters(model), lr=lr)
    strategy.attach(opt)
    strategy.train_step(StepContext(model=model, forward=model, optimizer=opt, loss=_seg_loss), {"image": task_image})
    return model


def test_kd_fft_joint_is_one_optimiser_on_the_weighted_sum(tiny_unet):
    torch.manual_seed(0)
    teacher = frozen_copy(tiny_unet(seed=2))
    task_image, buffer_image = torch.randn(2, 1, 16, 32, 32), torch.randn(2, 1, 16, 32, 32)
    ref = tiny_unet(seed=1)
    w0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    total = _seg_loss(ref, None, ref(task_image)) + 0.5 * FeatureDistillation(teacher)(ref, {"image": buffer_image})
    grads = dict(zip([n for n, _ in ref.named_parameters()],
                     torch.autograd.grad(total, list(ref.parameters()), allow_unused=True)))
    strategy = KDFineTuning(teacher, FixedSampler(buffer_image), seed=0, mode="joint", weight=0.5)
    model = _kd_step(tiny_unet(seed=1), strategy, task_image)
    for name, p in model.named_parameters():
        g = grads[name] if grads[name] is not None else torch.zeros_like(p)
        torch.testing.assert_close(p.detach(), w0[name] - 0.1 * g, rtol=1e-5, atol=1e-6, msg=name)
    assert strategy.kd_optimizer is None and strategy.config() == {"name": "kd-fft", "buffer": True,
                                                                   "mode": "joint", "weight": 0.5}


def test_kd_fft_capped_keeps_the_distillation_step_within_the_task_step(tiny_unet):
    torch.manual_seed(0)
    teacher = frozen_copy(tiny_unet(seed=2))
    task_image, buffer_image = torch.randn(2, 1, 16, 32, 32), torch.randn(2, 1, 16, 32, 32)
    moved = {}
    for mode in ("separate", "capped"):
        model = tiny_unet(seed=1)
        w0 = [p.detach().clone() for p in encoder_parameters(model)]
        strategy = KDFineTuning(teacher, FixedSampler(buffer_image), seed=0, mode=mode)
        model = _kd_step(model, strategy, task_image, lr=1e-3, optimizer="adam")
        moved[mode] = float(torch.sqrt(sum(((p.detach() - a) ** 2).sum()
                                           for p, a in zip(encoder_parameters(model), w0))))
    # Adam's first step moves every weight by lr whatever the loss: the separate KD step is as long as the task's,
    # capped it is at most as long, so the encoder moves at most twice the task step (separate: up to twice too,
    # but never less than the capped)
    assert moved["capped"] <= moved["separate"] + 1e-9
    strategy = KDFineTuning(teacher, FixedSampler(buffer_image), seed=0, mode="capped")
    model = tiny_unet(seed=1)
    model = strategy.prepare(model)
    opt = torch.optim.Adam(strategy.parameters(model), lr=1e-3)
    ctx = StepContext(model=model, forward=model, optimizer=opt, loss=_seg_loss)
    before = [p.detach().clone() for p in encoder_parameters(model)]
    from medadapt.engine.strategy import default_train_step
    seg_only = copy.deepcopy(model)
    opt2 = torch.optim.Adam(list(seg_only.parameters()), lr=1e-3)
    default_train_step(StepContext(model=seg_only, forward=seg_only, optimizer=opt2, loss=_seg_loss),
                       {"image": task_image})
    strategy.train_step(ctx, {"image": task_image})
    seg = torch.sqrt(sum(((a.detach() - b) ** 2).sum() for a, b in zip(encoder_parameters(seg_only), before)))
    kd = torch.sqrt(sum(((p.detach() - a.detach()) ** 2).sum()
                        for p, a in zip(encoder_parameters(model), encoder_parameters(seg_only))))
    assert kd <= seg * (1 + 1e-5)


@pytest.mark.parametrize("norm", ["train", "copy"])
def test_lora_kd_norm_readings(tiny_unet, tmp_path, norm):
    from medadapt.engine import Trainer, TrainingConfig
    from medadapt.tuning.distill import copy_encoder_norms, encoder_norm_parameters

    previous, mid = tiny_unet(seed=1), frozen_copy(tiny_unet(seed=2))
    with torch.no_grad():  # E_{t-mid}'s norms differ from E_{t-1}'s, as fine-tuning makes them
        for p in encoder_norm_parameters(mid):
            p.add_(0.1 * torch.randn_like(p))
    prev_norms = [p.detach().clone() for p in encoder_norm_parameters(previous)]
    student = copy.deepcopy(previous)
    kd = EncoderLoRADistillation(rank=2, norm=norm)
    student = kd.prepare(student)
    if norm == "copy":
        copy_encoder_norms(mid, student)
    images = torch.randn(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))

    class Sampler:
        def sample(self, rng):
            return {"image": images}

    config = TrainingConfig(epochs=2, iterations_per_epoch=3, initial_lr=1e-2, grad_clip=None,
                            optimizer={"name": "adamw", "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
                            schedule={"name": "constant"}, loss={"name": "encoder-feature-mse"})
    Trainer(student, kd, Sampler(), config, tmp_path / "kd", loss=FeatureDistillation(mid), progress=False).fit()
    merged = kd.finalize(student)
    norms = encoder_norm_parameters(merged)
    assert norms
    if norm == "train":  # trained with the factors and kept by the merge
        assert any(not torch.equal(a.detach(), b) for a, b in zip(norms, prev_norms))
        assert kd.config()["norm"] == "train"
    else:  # E_{t-mid}'s, untouched by the distillation
        for a, b in zip(norms, encoder_norm_parameters(mid)):
            assert torch.equal(a.detach(), b.detach())


def test_kd_readings_refused_where_the_stage_is_missing(world, tmp_path, capsys):
    fm, stream = str(world["fm"]), str(_stream(world, tmp_path))
    run = ["--model", fm, "--out", str(tmp_path / "r"), "--quiet"]
    err = _err(capsys, ["seqft", stream, *run, "--method", "seq-ft", "--kd-norm", "train"])
    assert "--kd-norm train" in err and "seq-ft" in err and "lora-kd" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "seq-ft", "--retention", "lora-kd", "--kd-fft", "joint"])
    assert "--kd-fft joint" in err and "--buffer" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "full", "--kd-norm", "copy"])
    assert "--kd-norm copy" in err and "--method full" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "medseqft", "--kd-fft", "separate", "--kd-weight", "2"])
    assert "--kd-weight 2" in err and "joint" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "medseqft", "--kd-fft", "joint", "--kd-weight", "-1"])
    assert "--kd-weight -1" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "medseqft", "--kd-lr-fraction", "0"])
    assert "--kd-lr-fraction 0" in err and "(0, 10]" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "medseqft", "--kd-lr-fraction", "1",
                        "--kd-recipe", "cpu-finetune"])
    assert "--kd-lr-fraction" in err and "--kd-recipe" in err
    err = _err(capsys, ["seqft", stream, *run, "--method", "seq-ft", "--kd-lr-fraction", "1"])
    assert "--kd-lr-fraction" in err and "lora-kd" in err
    assert not (tmp_path / "r").exists()


def test_overlap_is_checked_and_recorded_only_when_set(world, tmp_path, capsys):
    """--overlap (the test predictions' tile overlap): out of range is one line; nnU-Net's 0.5 is not recorded
    (runs made before the option keep their identity), another value is."""
    from medadapt.workflows.seqft import SeqftRequest, resolve_seqft

    fm, stream = str(world["fm"]), _stream(world, tmp_path)
    err = _err(capsys, ["seqft", str(stream), "--model", fm, "--out", str(tmp_path / "r"), "--quiet",
                        "--method", "full", "--overlap", "1.2"])
    assert "--overlap 1.2" in err and "[0, 1)" in err
    assert not (tmp_path / "r").exists()
    default = resolve_seqft(SeqftRequest(stream, fm, "full")).to_dict()
    assert "overlap" not in default
    quarter = resolve_seqft(SeqftRequest(stream, fm, "full", overlap=0.25))
    assert quarter.overlap == 0.25 and quarter.to_dict() == {**default, "overlap": 0.25}


def test_a_moved_stream_and_foundation_resume_their_run(world, seq_run, tmp_path):
    """A run folder, its tasks' datasets and its foundation copied elsewhere (another disk, a clone): the run is
    the same run (what the folders hold is compared, not where they lie), so --resume finds every task finished."""
    import shutil

    moved = tmp_path / "elsewhere"
    for name in ("tgt", "src", "fm"):
        shutil.copytree(world[name], moved / name)
    stream = tmp_path / "moved.yaml"
    stream.write_text(f"name: tiny\ntasks:\n  - data: {moved / 'tgt'}\n  - data: {moved / 'src'}\n")
    out = tmp_path / "run"
    shutil.copytree(seq_run, out)
    before = {p: p.read_text() for p in sorted(out.glob("tasks/*/task.json"))}
    assert main(["seqft", str(stream), "--model", str(moved / "fm"), "--out", str(out), *SEQ, "--resume"]) == 0
    assert {p: p.read_text() for p in sorted(out.glob("tasks/*/task.json"))} == before  # nothing re-ran
    identity = json.loads((out / "seqft.json").read_text())
    assert identity["tasks"][0]["data"] == str(moved / "tgt")  # the record says where the data lies now


def test_identity_ignores_where_inputs_lie_not_what_they_are(tmp_path):
    from medadapt.errors import MedadaptError
    from medadapt.workflows.identity import check_identity, record_identity

    identity = {"format": "x/1", "dataset": {"path": "/a/Dataset001", "name": "D", "cases": "c1"},
                "foundation": {"path": "/a/fm", "weights": "w1"}, "model": "/a/fm", "data": "/a/Dataset001",
                "split": {"kind": "file", "path": "/a/splits.json", "fold": 0, "sha256": "s1"},
                "training": {"epochs": 2}, "settings_digest": "d1"}
    record_identity(tmp_path, identity)
    moved = json.loads(json.dumps(identity).replace("/a/", "/b/"))
    moved["settings_digest"] = "d2"  # it folds the paths in; the settings it digests are compared themselves
    check_identity(tmp_path, moved)
    for key, value in (("dataset", {**identity["dataset"], "cases": "c2"}),
                       ("foundation", {**identity["foundation"], "weights": "w2"}),
                       ("split", {**identity["split"], "sha256": "s2"}), ("training", {"epochs": 3})):
        with pytest.raises(MedadaptError, match=key):
            check_identity(tmp_path, {**moved, key: value})


def test_kd_lr_fraction_sets_the_derived_kd_recipes_lr(world, tmp_path):
    from medadapt.workflows.seqft import KD_LR_FRACTION, SeqftRequest, resolve_seqft

    stream = _stream(world, tmp_path)
    base = resolve_seqft(SeqftRequest(stream, world["fm"], "seq-ft", retention="lora-kd", recipe="cpu-finetune"))
    assert base.kd_recipe.lr == pytest.approx(KD_LR_FRACTION * base.recipe.lr)
    same = resolve_seqft(SeqftRequest(stream, world["fm"], "seq-ft", retention="lora-kd", recipe="cpu-finetune",
                                      kd_lr_fraction=KD_LR_FRACTION))
    assert same.to_dict() == base.to_dict()  # the default written out is the same run
    assert base.kd_recipe.lr == pytest.approx(base.recipe.lr)  # decided: the fine-tuning's own lr
    tenth = resolve_seqft(SeqftRequest(stream, world["fm"], "seq-ft", retention="lora-kd", recipe="cpu-finetune",
                                       kd_lr_fraction=0.1))
    assert tenth.kd_recipe.lr == pytest.approx(0.1 * tenth.recipe.lr)
    assert {k for k in tenth.to_dict() if tenth.to_dict()[k] != base.to_dict()[k]} == {"kd_recipe", "kd_training"}
    # --kd-until budget: the paper's ratios together (a fifth of the epochs, a tenth of the lr)
    budget = resolve_seqft(SeqftRequest(stream, world["fm"], "seq-ft", retention="lora-kd", recipe="cpu-finetune",
                                        kd_until="budget"))
    assert budget.kd_recipe.lr == pytest.approx(0.1 * budget.recipe.lr)


def test_the_kd_based_fft_is_joint_by_default_where_there_is_one(world, tmp_path):
    """Issue 43's decision: one optimiser on L_seg + λ·L_kd where a buffer gives the KD-based FFT a stage; a
    method without one records nothing of it, and the other readings stay options."""
    from medadapt.workflows.seqft import KD_FFT_DEFAULT, resolve_method

    assert KD_FFT_DEFAULT == "joint"
    assert resolve_method("seq-ft", buffer="random").record()["kd_fft"] == "joint"
    assert resolve_method("seq-ft", buffer="random").record()["kd_weight"] == 1.0
    assert "kd_fft" not in resolve_method("seq-ft", buffer="random", kd_fft="separate").record()
    assert "kd_fft" not in resolve_method("seq-ft").record()  # no buffer: no KD-based FFT
    assert resolve_method("medseqft", kd_fft="capped").record()["kd_fft"] == "capped"
