"""Purposeful seeds: every random stream from the run's seed and its purpose (medadapt.utils.seeds)."""
import numpy as np
import pytest
import torch

from medadapt.utils import seeds


def test_every_purpose_has_its_own_stream():
    codes = [code for code, _ in seeds.PURPOSES.values()]
    assert len(set(codes)) == len(codes)
    for seed in (0, 1, 7):
        firsts = {p: seeds.numpy_rng(seed, p).integers(2 ** 62) for p in seeds.PURPOSES}
        assert len(set(firsts.values())) == len(firsts)
        torch_seeds = {p: seeds.torch_seed(seed, p) for p in seeds.PURPOSES}
        assert len(set(torch_seeds.values())) == len(torch_seeds) and all(0 <= v < 2 ** 63 for v in torch_seeds.values())
    # keys: integers and strings (a case id), each key its own stream, reproducible
    assert seeds.sequence(3, "mds", "task/case-1")[:2] == [3, seeds.PURPOSES["mds"][0]]
    assert seeds.torch_seed(3, "mds", "a") != seeds.torch_seed(3, "mds", "b")
    assert seeds.torch_seed(3, "batches", 1, 2) == seeds.torch_seed(3, "batches", 1, 2)
    with pytest.raises(KeyError):
        seeds.sequence(0, "no-such-purpose")
    with pytest.raises(ValueError):
        seeds.sequence(-1, "head")


def test_torch_stream_restores_the_global_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeds.torch_stream(0, "head"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # the block's draws did not move the global stream
    with seeds.torch_stream(0, "head"):
        assert torch.equal(torch.rand(3), inside)


def test_split_and_shots_do_not_share_a_permutation():
    from medadapt.data.splits import draw_shots, train_test_split

    ids = [f"case{i:02d}" for i in range(40)]
    train, test = train_test_split(ids, 0.2, seed=0)
    assert len(test) == 8 and train_test_split(ids, 0.2, seed=0) == (train, test)
    # before the scheme both were default_rng(seed).permutation: the shots were the split's first entries
    perm = np.random.default_rng(0).permutation(len(ids))
    assert draw_shots(ids, 8, seed=0) != [ids[i] for i in perm[:8]]
    assert sorted(draw_shots(ids, 8, seed=0)) != sorted(test)


def test_a_fresh_head_is_not_the_foundations_initial_head(world, tmp_path):
    """For every seed: the head ``load_foundation`` draws for fine-tuning seed s differs from the initial head of
    a foundation pretrained with seed s (both were torch.manual_seed(s) before the scheme; a foundation
    pretrained for 0 steps then gave a fresh head equal to its own)."""
    from medadapt.data.dataset import RawDataset
    from medadapt.models import load_model_folder, save_model_folder
    from medadapt.models.network import seeded_network
    from medadapt.workflows.finetune import head_parameter_names, load_foundation

    folder = load_model_folder(world["fm"])
    dataset = RawDataset.load(world["tgt"])
    assert dataset.labels == folder.labels
    heads = head_parameter_names(folder.load_network())
    for seed in (0, 1, 2):
        initial = seeded_network(folder.network, seed)  # what `medadapt pretrain --seed s` starts from
        save_model_folder(tmp_path / f"fm{seed}", initial, folder)  # a foundation pretrained for 0 steps
        untrained = load_model_folder(tmp_path / f"fm{seed}")
        start = initial.state_dict()
        fresh = load_foundation(untrained, dataset, seed=seed).state_dict()
        weights = [k for k in heads if k.endswith("weight")]
        assert weights
        for k in weights:
            assert not torch.equal(fresh[k], start[k]), (seed, k)
            assert (fresh[k] - start[k]).abs().max() > 1e-3
        for k in set(start) - set(heads):  # everything else is the foundation's
            assert torch.equal(fresh[k], start[k]), k
        # and the fresh head is the head stream's: seeded_network on the "head" purpose, same seed
        reference = seeded_network(folder.network, seed, purpose="head").state_dict()
        for k in heads:
            assert torch.equal(fresh[k], reference[k]), k


def test_cell_keys_and_run_identities_carry_the_scheme():
    from medadapt.benchmark.grid import load_config
    from medadapt.benchmark.medseqft import load_config as load_medseqft

    assert load_config("quick").foundation_key()["seeds"] == seeds.SCHEME
    assert load_medseqft("medseqft-quick").foundation_key()["seeds"] == seeds.SCHEME
    record = seeds.record(5, split_seed=2)
    assert record["scheme"] == seeds.SCHEME and record["streams"]["split"]["sequence"][0] == 2
    assert record["streams"]["head"]["sequence"] == [5, seeds.PURPOSES["head"][0]]
