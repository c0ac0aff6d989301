"""Self-supervised foundations: nnssl's block masking and masked-voxel MSE, the masked sampler, the mae recipes,
pretrain --objective mae, pretrain-ssl-head, load_pretext and the errors around them."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from medadapt.cli import main
from medadapt.engine.recipe import load_recipe, parse_recipe
from medadapt.errors import MedadaptError
from medadapt.models import load_model_folder
from medadapt.ssl import (MaskConfig, MaskedReconstructionLoss, MaskedSampler, apply_mask, load_pretext, mae_loss,
                          random_block_mask)
from medadapt.ssl.pretext import PRETEXT_FILE, encoder_state_keys


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medadapt {command}: error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------------- masking
def test_mask_ratio_and_block_structure():
    config = MaskConfig(block_size=(4, 8, 8), mask_ratio=0.75)
    mask = random_block_mask((3, 2, 16, 32, 32), config, torch.Generator().manual_seed(0))
    assert mask.shape == (3, 1, 16, 32, 32) and mask.dtype == torch.bool  # one mask per sample, for every channel
    blocks = mask.view(3, 4, 4, 4, 8, 4, 8)  # [B, bz, z, by, y, bx, x]
    per_block = blocks.permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 64, -1)
    assert (per_block.all(-1) | ~per_block.any(-1)).all()  # every block is all masked or all visible
    assert per_block.all(-1).sum(1).tolist() == [48, 48, 48]  # exactly 75 % of the 64 blocks, per sample
    assert mask.float().mean() == 0.75
    assert not torch.equal(mask[0], mask[1])  # samples draw their own blocks
    same = random_block_mask((3, 2, 16, 32, 32), config, torch.Generator().manual_seed(0))
    assert torch.equal(mask, same)
    rng_mask = random_block_mask((3, 2, 16, 32, 32), config, np.random.default_rng(0))
    assert torch.equal(rng_mask, random_block_mask((3, 2, 16, 32, 32), config, np.random.default_rng(0)))
    assert rng_mask.float().mean() == 0.75


def test_blocks_cover_a_patch_that_is_no_multiple():
    config = MaskConfig(block_size=8, mask_ratio=0.5)
    assert config.block_size == (8, 8, 8) and config.grid((10, 16, 20)) == (2, 2, 3)
    mask = random_block_mask((2, 1, 10, 16, 20), config, np.random.default_rng(1))
    assert mask.shape == (2, 1, 10, 16, 20)
    for b in range(2):
        masked = 0
        for z in range(2):
            for y in range(2):
                for x in range(3):
                    block = mask[b, 0, 8 * z:8 * z + 8, 8 * y:8 * y + 8, 8 * x:8 * x + 8]
                    assert block.all() or not block.any()
                    masked += int(block.all())
        assert masked == 6  # floor(0.5 * 12)
    assert MaskConfig(block_size=1, mask_ratio=0.29).masked_blocks((1, 10, 10)) == 29  # 0.29 * 100 floats below 29


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size 0"), ({"block_size": (8, 8)}, "block_size"), ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": 0}, "mask_ratio"), ({"block_size": True}, "block_size")])
def test_mask_config_validation(kwargs, message):
    with pytest.raises(MedadaptError, match=message):
        MaskConfig(**kwargs)


def test_mask_that_hides_nothing_is_refused():
    with pytest.raises(MedadaptError, match="masks none of them; use smaller blocks"):
        MaskConfig(block_size=16, mask_ratio=0.75).masked_blocks((16, 16, 16))


def test_apply_mask_zeroes_masked_voxels_in_every_channel():
    image = torch.randn(2, 3, 8, 8, 8) + 5
    mask = random_block_mask(image.shape, MaskConfig(block_size=4), np.random.default_rng(0))
    out = apply_mask(image, mask)
    full = mask.expand_as(image)
    assert (out[full] == 0).all() and torch.equal(out[~full], image[~full])


# ---------------------------------------------------------------------------------------------------- loss
def test_mae_loss_counts_only_masked_voxels():
    target = torch.zeros(1, 1, 1, 2, 2)
    pred = torch.tensor([1.0, 2.0, 3.0, 100.0]).view(1, 1, 1, 2, 2)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 2, 2)
    assert mae_loss(pred, target, mask).item() == pytest.approx((1 + 4 + 9) / 3)  # the visible 100 does not count
    # two channels share the mask: the mean over masked voxel entries
    pred2 = torch.cat([pred, 2 * pred], 1)
    assert mae_loss(pred2, torch.zeros_like(pred2), mask).item() == pytest.approx((14 + 4 * 14) / 6)


def test_mae_loss_per_sample():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    mask = torch.rand(3, 1, 4, 4, 4, generator=g) > 0.5
    per_sample = mae_loss(pred, target, mask, reduction="none")
    assert per_sample.shape == (3,)
    for b in range(3):
        m = mask[b].expand(2, -1, -1, -1)
        assert per_sample[b].item() == pytest.approx(((pred[b] - target[b])[m] ** 2).mean().item(), rel=1e-6)
    counts = mask.flatten(1).sum(1).float()
    weighted = (per_sample * counts).sum() / counts.sum()  # "mean": every masked voxel of the batch weighs the same
    assert mae_loss(pred, target, mask).item() == pytest.approx(weighted.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        mae_loss(pred, target, mask, reduction="sum")


def test_mae_loss_gives_no_gradient_to_visible_voxels():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 1, 8, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 1, 8, 8, 8, generator=g)
    mask = random_block_mask(pred.shape, MaskConfig(block_size=4, mask_ratio=0.5), g)
    MaskedReconstructionLoss()(None, {"target": target, "mask": mask}, [pred, pred[:, :, ::2, ::2, ::2]]).backward()
    assert (pred.grad[~mask] == 0).all()
    assert (pred.grad[mask] != 0).all()
    with pytest.raises(MedadaptError, match="batches are not masked"):
        MaskedReconstructionLoss()(None, {"label": target}, pred)


def test_masked_sampler_is_driven_by_the_rng_alone():
    class Patches:
        patch_size, batch_size = (8, 8, 8), 2

        def sample(self, rng):
            return {"image": torch.from_numpy(rng.normal(size=(2, 1, 8, 8, 8)).astype(np.float32)),
                    "label": torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)}

    sampler = MaskedSampler(Patches(), MaskConfig(block_size=4))
    a, b = sampler.sample(np.random.default_rng(7)), sampler.sample(np.random.default_rng(7))
    assert set(a) == {"image", "target", "mask"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["image"], apply_mask(a["target"], a["mask"]))
    assert not torch.equal(a["mask"], sampler.sample(np.random.default_rng(8))["mask"])
    with pytest.raises(MedadaptError, match="masks none"):
        MaskedSampler(Patches(), MaskConfig(block_size=8))


def test_mae_recipes():
    nnssl = load_recipe("mae-nnssl")
    assert nnssl.loss == {"name": "mae", "block_size": [16, 16, 16], "mask_ratio": 0.75}
    assert (nnssl.lr, nnssl.epochs, nnssl.iterations_per_epoch, nnssl.patch_size) == (1e-2, 1000, 250, (160,) * 3)
    assert load_recipe("cpu-mae-pretrain").loss["block_size"] == [8, 8, 8]
    with pytest.raises(MedadaptError, match=r"^my\.yaml: loss: mask block_size \[0, 8, 8\]"):
        parse_recipe({"optimizer": "sgd", "schedule": "poly", "loss": {"name": "mae", "block_size": [0, 8, 8]},
                      "epochs": 1, "iterations_per_epoch": 1, "lr": 0.1}, source="my.yaml")


# ------------------------------------------------------------------------------------------------ workflows
@pytest.fixture(scope="module")
def mae_fm(world):
    out = world["root"] / "mae-fm"
    assert main(["pretrain", "--data", str(world["src"]), "--out", str(out), "--preset", "cpu-tiny", "--objective",
                 "mae", "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"]) == 0
    return out


def test_pretrain_mae_writes_a_scoring_foundation(mae_fm):
    folder = load_model_folder(mae_fm)
    assert folder.self_supervised_only and folder.labels == {"background": 0}
    assert folder.network.num_classes == folder.network.input_channels == 1
    assert folder.pretext["weights"] == "weights.pt" and folder.pretext["mask"] == {"block_size": [8, 8, 8],
                                                                                    "mask_ratio": 0.75}
    pretext = load_pretext(mae_fm)
    assert not pretext.network.training and pretext.patch_size == (16, 32, 32)
    images = torch.randn(3, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    first = pretext.sample_losses(images, torch.Generator().manual_seed(1))
    assert first.shape == (3,) and torch.isfinite(first).all() and not first.requires_grad
    assert torch.equal(first, pretext.sample_losses(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, pretext.sample_losses(images, torch.Generator().manual_seed(2)))
    history = json.loads((mae_fm / "training" / "history.json").read_text())
    assert len(history["iteration_loss"]) == 2


def test_mae_foundation_finetunes_with_a_fresh_head_only(world, mae_fm, tmp_path, capsys):
    run = ["finetune", "--model", str(mae_fm), "--data", str(world["tgt"]), "--method", "full", "--shots", "2",
           "--epochs", "1", "--iterations-per-epoch", "1", "--quiet"]
    assert main(run + ["--out", str(tmp_path / "fresh")]) == 0
    tuned = load_model_folder(tmp_path / "fresh" / "model")
    assert tuned.pretext is None and tuned.network.num_classes == len(tuned.labels)
    capsys.readouterr()
    assert main(run + ["--out", str(tmp_path / "keep"), "--head", "keep"]) == 2
    assert "self-supervised foundation" in _one_error_line(capsys, "finetune")
    assert main(["zero-shot", "--model", str(mae_fm), "--data", str(world["tgt"]), "--out", str(tmp_path / "zs"),
                 "--quiet"]) == 2
    assert "without a segmentation head" in _one_error_line(capsys, "zero-shot")
    assert main(["predict", "--model", str(mae_fm), "--input", str(world["tgt"] / "imagesTr"), "--out",
                 str(tmp_path / "pred"), "--quiet"]) == 2
    assert "fine-tune it first" in _one_error_line(capsys, "predict")
    assert not any((tmp_path / d).exists() for d in ("keep", "zs", "pred"))


@pytest.mark.parametrize("method, extra", [("linear-probe", []), ("lora", ["--lora-rank", "2"])])
def test_peft_on_an_mae_foundation_trains_decoder_and_head(world, mae_fm, tmp_path, method, extra):
    """MedSeqFT's reading (docs/methods.md): on a self-supervised foundation the decoder (trained on the pretext
    task) is new for segmentation, so a PEFT row trains it and the head in full and leaves the encoder as the
    method says: bit-identical for the linear probe, base weights unchanged (and a low-rank change merged in)
    for LoRA. --pretext-decoder pretrained gives the other reading: the decoder frozen as well."""
    from medadapt.models.parts import decoder_parameters, encoder_parameters
    from medadapt.workflows.finetune import head_parameter_names

    start = load_model_folder(mae_fm).load_network()
    enc_ids = {id(p) for p in encoder_parameters(start)}
    enc = {n for n, p in start.named_parameters() if id(p) in enc_ids}
    dec_ids = {id(p) for p in decoder_parameters(start)}
    heads = set(head_parameter_names(start))
    dec = {n for n, p in start.named_parameters() if id(p) in dec_ids} - heads
    assert enc and dec and heads
    base = ["finetune", "--model", str(mae_fm), "--data", str(world["tgt"]), "--method", method, "--shots", "2",
            "--epochs", "1", "--iterations-per-epoch", "2", "--lr", "0.05", "--quiet", *extra]
    runs = {}
    for policy in ("auto", "pretrained"):
        out = tmp_path / policy
        assert main(base + ["--out", str(out), "--pretext-decoder", policy]) == 0
        runs[policy] = (load_model_folder(out / "model").load_network().state_dict(),
                        json.loads((out / "run.json").read_text()))
    s0 = start.state_dict()
    tuned, run = runs["auto"]
    assert run["method"]["decoder"] == "new"
    if method == "linear-probe":
        assert all(torch.equal(tuned[k], s0[k]) for k in enc)  # the encoder bit-identical
    assert sum(not torch.equal(tuned[k], s0[k]) for k in dec) > len(dec) // 2  # the decoder trained
    frozen, run = runs["pretrained"]
    assert "decoder" not in run["method"]
    if method == "linear-probe":  # the text-minimal reading: everything but the head frozen
        assert all(torch.equal(frozen[k], s0[k]) for k in enc | dec)
    assert run["parameters"]["trainable"] < runs["auto"][1]["parameters"]["trainable"]


def test_pretrain_ssl_head_keeps_the_encoder(world, tmp_path, capsys):
    out = tmp_path / "fm-ssl"
    args = ["pretrain-ssl-head", "--model", str(world["fm"]), "--data", str(world["src"]), "--out", str(out),
            "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"]
    assert main(args) == 0
    foundation = torch.load(world["fm"] / "weights.pt", weights_only=True)
    copied = torch.load(out / "weights.pt", weights_only=True)
    assert foundation.keys() == copied.keys() and all(torch.equal(foundation[k], copied[k]) for k in foundation)
    own = torch.load(out / PRETEXT_FILE, weights_only=True)
    pretext = load_pretext(out)
    encoder = encoder_state_keys(pretext.network)
    assert encoder and not encoder & set(own)  # pretext.pt: the decoder copy and head only
    state = pretext.network.state_dict()
    assert all(torch.equal(state[k], foundation[k]) for k in encoder)  # bit-identical encoder
    assert any(not torch.equal(state[k], foundation[k]) for k in own if k in foundation
               and foundation[k].shape == state[k].shape)  # the decoder copy was trained
    plans, before = (json.loads((p / "plans.json").read_text()) for p in (out, world["fm"]))
    assert plans.pop("pretext")["weights"] == PRETEXT_FILE and before.pop("pretext", None) is None
    assert plans == before
    images = torch.randn(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    losses = pretext.sample_losses(images, np.random.default_rng(0))
    assert losses.shape == (2,) and torch.equal(losses, pretext.sample_losses(images, np.random.default_rng(0)))
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume" in _one_error_line(capsys, "pretrain-ssl-head")
    assert main(args + ["--resume"]) == 0  # the finished folder is reused
    for name in ("plans.json", PRETEXT_FILE, "weights.pt"):  # killed after its last checkpoint, before the folder
        (out / name).unlink()
    assert main(args + ["--seed", "1", "--resume"]) == 2
    assert "seed" in _one_error_line(capsys, "pretrain-ssl-head")
    assert main(args + ["--resume"]) == 0
    resumed = torch.load(out / PRETEXT_FILE, weights_only=True)
    assert resumed.keys() == own.keys() and all(torch.equal(resumed[k], own[k]) for k in own)


def test_folder_without_pretext(world):
    with pytest.raises(MedadaptError, match=r"fm: has no self-supervised pretext network.*medadapt pretrain-ssl-head"):
        load_pretext(world["fm"])
    assert load_model_folder(world["fm"]).pretext is None  # plans.json without the field still loads


@pytest.mark.parametrize("extra, command, message", [
    (["--objective", "mae", "--activation", "sigmoid"], "pretrain", "--activation"),
    (["--objective", "mae", "--recipe", "cpu-pretrain"], "pretrain", "needs a recipe whose loss is mae"),
    (["--recipe", "cpu-mae-pretrain"], "pretrain", "not a segmentation loss"),
    (["--objective", "mae", "--recipe", "cpu-mae-pretrain", "--preset", "cpu-tiny", "--iterations-per-epoch", "1",
      "--epochs", "1", "--sampling", "datasets", "--data", "/nonexistent"], "pretrain", "/nonexistent"),
])
def test_pretrain_bad_input(world, tmp_path, capsys, extra, command, message):
    code = main(["pretrain", "--data", str(world["src"]), "--out", str(tmp_path / "m"), "--quiet", *extra])
    assert code == 2
    assert message in _one_error_line(capsys, command)
    assert not (tmp_path / "m").exists()


def test_pretrain_ssl_head_bad_input(world, mae_fm, tmp_path, capsys):
    base = ["pretrain-ssl-head", "--data", str(world["src"]), "--quiet", "--epochs", "1", "--iterations-per-epoch", "1"]
    cases = [
        (["--model", str(mae_fm), "--out", str(tmp_path / "a")], "already has a pretext network"),
        (["--model", str(world["fm"]), "--out", str(world["fm"])], "is the foundation's own folder"),
        (["--model", str(tmp_path / "none"), "--out", str(tmp_path / "b")], "no such model folder and not a built-in foundation"),
        (["--model", str(world["fm"]), "--out", str(tmp_path / "c"), "--recipe", "cpu-finetune"], "loss is mae"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in _one_error_line(capsys, "pretrain-ssl-head")
    with pytest.raises(SystemExit) as exc:
        main(["pretrain-ssl-head", "--help"])
    assert exc.value.code == 0 and "frozen" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- SwinUNETR
def _swin_recipe(name):
    """A built-in recipe at the smallest trainable SwinUNETR patch and budget (one iteration)."""
    return {**load_recipe(name).to_dict(), "name": f"{name}-test", "epochs": 1, "iterations_per_epoch": 1,
            "batch_size": 1, "patch_size": [32, 32, 64], "schedule": {"name": "constant"}}


def test_swin_foundations(world, tmp_path):
    """MONAI's SwinUNETR: pretrained by masked reconstruction, and given a pathway (``out`` is its head)."""
    from medadapt.models import preset, save_model_folder
    from medadapt.models.network import seeded_network
    from medadapt.workflows.pretrain import PretrainRequest, pretrain, resolve_pretrain
    from medadapt.workflows.ssl import SslHeadRequest, pretrain_ssl_head

    mae = _swin_recipe("cpu-swin-mae-pretrain")
    pretrain(resolve_pretrain(PretrainRequest(world["src"], preset_name="cpu-swin", recipe=mae, objective="mae")), tmp_path / "mae",
             progress=False)
    images = torch.randn(2, 1, 32, 32, 64, generator=torch.Generator().manual_seed(0))
    pretext = load_pretext(tmp_path / "mae")
    losses = pretext.sample_losses(images, torch.Generator().manual_seed(3))
    assert losses.shape == (2,) and torch.equal(losses, pretext.sample_losses(images, torch.Generator().manual_seed(3)))

    # a supervised SwinUNETR foundation (untrained: the pathway's training is what is tested) on the world's plan
    fm = load_model_folder(world["fm"])
    spec = preset("cpu-swin", input_channels=1, num_classes=fm.network.num_classes)
    save_model_folder(tmp_path / "fm", seeded_network(spec, 0),
                      dataclasses.replace(fm, network=spec, provenance={}, path=None))
    pretrain_ssl_head(SslHeadRequest(tmp_path / "fm", world["src"], recipe=mae), tmp_path / "fm-ssl", progress=False)
    own = torch.load(tmp_path / "fm-ssl" / PRETEXT_FILE, weights_only=True)
    assert own["out.conv.conv.weight"].shape == (1, 12, 1, 1, 1)  # the reconstruction head: one output channel
    assert not any(k.startswith(("swinViT.", "encoder")) for k in own)
    foundation = torch.load(tmp_path / "fm" / "weights.pt", weights_only=True)
    pretext = load_pretext(tmp_path / "fm-ssl")
    state = pretext.network.state_dict()
    encoder = encoder_state_keys(pretext.network)
    assert any(k.startswith("swinViT.") for k in encoder)
    assert not any(k.startswith(("decoder", "out.")) for k in encoder)
    assert all(torch.equal(state[k], foundation[k]) for k in encoder)
    assert pretext.sample_losses(images, torch.Generator().manual_seed(3)).shape == (2,)
