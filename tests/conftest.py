import os

import pytest
import torch
import yaml

from medadapt.synth.spec import DOMAINS_DIR

# Keep torch from oversubscribing the cores: at most 2 threads, and under pytest-xdist (pyproject's addopts: one
# worker per core, at most 4) each worker's share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def tiny_unet():
    """A tiny nnU-Net PlainConvUNet (3 stages, 4-8-16 features, conv bias, InstanceNorm, deep supervision)."""
    from medadapt.models import build_network, preset

    def make(seed: int = 0, num_classes: int = 2):
        torch.manual_seed(seed)
        return build_network(preset("cpu-tiny", input_channels=1, num_classes=num_classes))

    return make


def tiny_spec_yaml(builtin: str, name: str) -> str:
    """A built-in domain with the same field of view at a quarter of the voxels per axis pair (fast tests)."""
    spec = yaml.safe_load((DOMAINS_DIR / f"{builtin}.yaml").read_text())
    spec["name"] = name
    spec["case_prefix"] = name
    spec["shape"] = [max(8, s // 2) for s in spec["shape"]]
    spec["scanner"]["spacing_mm"] = [2 * v for v in spec["scanner"]["spacing_mm"]]
    spec["scanner"]["slice_thickness_mm"] = 2 * spec["scanner"]["slice_thickness_mm"]
    return yaml.safe_dump(spec)


@pytest.fixture(scope="session", autouse=True)
def medadapt_cache(tmp_path_factory):
    """The one place tests set medadapt's cache (``MEDADAPT_CACHE``): a folder of this session, set for the
    session and restored after it (never ~/.cache, never left set). Its cache folders are keyed by each
    dataset's absolute path, so tests that make their own data share it without seeing each other's."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDADAPT_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny source/target cohorts and a tiny foundation model, shared by the tests that need them."""
    from medadapt.cli import main

    root = tmp_path_factory.mktemp("world")
    paths = {"root": root}
    for name, builtin, n in (("src", "hn-source", 6), ("tgt", "hn-center-b", 10)):
        spec_file = root / f"{name}.yaml"
        spec_file.write_text(tiny_spec_yaml(builtin, name))
        paths[name] = root / name
        assert main(["synth", str(spec_file), "--out", str(paths[name]), "--cases", str(n), "--quiet"]) == 0
    paths["fm"] = root / "fm"
    assert main(["pretrain", "--data", str(paths["src"]), "--out", str(paths["fm"]), "--preset", "cpu-tiny",
                 "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"]) == 0
    return paths


@pytest.fixture(scope="session")
def assembly(tmp_path_factory):
    """Two tiny partially labelled cohorts (head and neck, chest) and a sigmoid foundation trained on both."""
    from medadapt.cli import main

    root = tmp_path_factory.mktemp("assembly")
    paths = {}
    for name, builtin, n in (("srca", "src-a-hn", 4), ("srcb", "src-b-chest", 4), ("tgt", "tgt-chest", 6)):
        spec_file = root / f"{name}.yaml"
        spec_file.write_text(tiny_spec_yaml(builtin, name))
        paths[name] = root / name
        assert main(["synth", str(spec_file), "--out", str(paths[name]), "--cases", str(n), "--quiet"]) == 0
    paths["fm"] = root / "fm"
    assert main(["pretrain", "--data", str(paths["srca"]), "--data", str(paths["srcb"]), "--out", str(paths["fm"]),
                 "--preset", "cpu-tiny", "--epochs", "1", "--iterations-per-epoch", "3", "--sampling", "datasets",
                 "--quiet"]) == 0
    return paths


def any_strategy(method: str, seed: int | None = None, **options):
    """``method``'s strategy with those of ``options`` it takes (tests that run every method with one set of
    option values; ``medadapt.tuning.make_strategy`` itself refuses an option a method does not take)."""
    from medadapt.tuning import make_strategy
    from medadapt.tuning.registry import options_for

    return make_strategy(method, seed=seed, **options_for(method, options))


def random_batches(n: int, seed: int = 0, shape=(16, 32, 32)):
    """Random image/label batches for a tiny 3-stage U-Net (deep supervision at 1/1 and 1/2 resolution)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 1, *shape, generator=g)
        y = (torch.rand(2, 1, *shape, generator=g) > 0.7).long()
        yield {"image": x, "label": y}


def segmentation_loss(model, batch):
    """nnU-Net's deep-supervised Dice + CE, as the engine trains with."""
    from medadapt.engine import DeepSupervisedDiceCE

    return DeepSupervisedDiceCE()(model(batch["image"]), batch["label"])




def assert_refused_in_one_line(argv, out, expected: str, capsys) -> None:
    """``medadapt argv`` (writing to ``out``) is refused: exit 2 (argparse's own or ours), one line on stderr
    that contains ``expected`` and no traceback, and nothing written to ``out``."""
    from medadapt.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own check of a flag's value
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


#: the modules that take longest (about 20 s to 130 s each on the 2-core CI machine, 2026-12-07), longest first:
#: under xdist's loadscope a module is one unit of work handed to the next free worker in collection order, and a
#: long module handed out last would leave the other cores idle until it ends
LONGEST_FIRST = ("test_nnunet", "test_results_of_record", "test_bench_medseqft", "test_bench_grid", "test_swin",
                 "test_workflows", "test_synth", "test_seqft", "test_bench_fseft", "test_predict_memory",
                 "test_bench_speed", "test_fseft", "test_engine", "test_calibration")


def pytest_collection_modifyitems(config, items):
    """Collect the longest modules first (:data:`LONGEST_FIRST`), every other module after them in its usual
    order; the tests within a module keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
