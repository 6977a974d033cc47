"""Shared fixtures: tiny random encoders and a generated messy MVSA data set, built once."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from msa.core.compute import PRECISION_PROBE_ENV
from msa.core.config import ExtractConfig
from msa.data.demo import make_demo_dataset, make_tiny_captioner, make_tiny_image_weights, make_tiny_text_model
from msa.training.autotune import DECISIONS_ENV

TINY_IMAGE_MODEL = "timm:test_efficientnet"


PRECISION_TESTS = Path(__file__).parent.parent / ".pytest_cache" / "precision-tests.txt"


def pytest_addoption(parser):
    parser.addoption("--precision-only", action="store_true",
                     help="run only the tests that consulted the CPU class in the last full run (CI's second pass, "
                          "as a bf16 CPU: every other test's outcome is the same on both)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--precision-only") or not PRECISION_TESTS.is_file():
        return  # without a record of a full run, every test runs
    wanted = set(PRECISION_TESTS.read_text().split())
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in wanted])
    items[:] = [i for i in items if i.nodeid in wanted]


def pytest_sessionstart(session):
    session.precision_tests = set()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    whole_suite = all(Path(arg).resolve() == Path(__file__).parent for arg in config.args)
    if whole_suite and not (config.getoption("--precision-only") or config.option.keyword or config.option.markexpr):
        PRECISION_TESTS.parent.mkdir(exist_ok=True)
        PRECISION_TESTS.write_text("".join(f"{nodeid}\n" for nodeid in sorted(session.precision_tests)))


PRECISION_FIXTURES: set[str] = set()  # shared fixtures (caches made once) that asked for the CPU class


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "function":  # those run after precision_probe, inside the test's record
        yield
        return
    probe = Path(tempfile.mkdtemp()) / "precision-probe"
    before = os.environ.get(PRECISION_PROBE_ENV)
    os.environ[PRECISION_PROBE_ENV] = str(probe)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PRECISION_PROBE_ENV, None)
        else:
            os.environ[PRECISION_PROBE_ENV] = before
        if probe.exists():
            PRECISION_FIXTURES.add(fixturedef.argname)


@pytest.fixture(autouse=True)
def precision_probe(request, tmp_path, monkeypatch):
    """Records the test when it, a process it starts or a shared fixture it uses asks which CPU
    class this is: its outcome can depend on the precision auto resolves to."""
    probe = tmp_path / "precision-probe"
    monkeypatch.setenv(PRECISION_PROBE_ENV, str(probe))
    yield
    if probe.exists() or PRECISION_FIXTURES & set(request.fixturenames):
        request.session.precision_tests.add(request.node.nodeid)


@pytest.fixture(autouse=True)
def private_autotune_file(tmp_path, monkeypatch) -> Path:
    """Measured precision decisions go to the test's own file, never the user's ~/.cache."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(DECISIONS_ENV, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "text": str(make_tiny_text_model(root / "tiny-bert")),
        "image_weights": str(make_tiny_image_weights(root / "test_efficientnet.pth", TINY_IMAGE_MODEL)),
        "captioner": str(make_tiny_captioner(root / "tiny-blip")),
    }


@pytest.fixture(scope="session")
def messy_data_source(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("mvsa"), n_labelled=24, n_test=6, messy=True)


@pytest.fixture
def messy_data(messy_data_source, tmp_path) -> Path:
    """A private copy, so a test may damage it."""
    return Path(shutil.copytree(messy_data_source, tmp_path / "mvsa"))


@pytest.fixture
def extract_config(messy_data_source, tiny_models, tmp_path):
    """An ExtractConfig on the messy data with the tiny encoders; override fields by keyword."""

    def make(**overrides) -> ExtractConfig:
        cfg = ExtractConfig(data=messy_data_source, cache=tmp_path / "cache", text_model=tiny_models["text"],
                            max_len=16, image_model=TINY_IMAGE_MODEL, image_weights=tiny_models["image_weights"],
                            batch_size=8, precision="fp32")  # tests compare numbers: the same on every CPU
        return dataclasses.replace(cfg, **overrides)

    return make


@pytest.fixture(scope="session")
def signal_cache(tmp_path_factory, tiny_models) -> Path:
    """Cached features of a clean generated data set with a planted signal."""
    from msa.stages import extract

    root = tmp_path_factory.mktemp("signal")
    data = make_demo_dataset(root / "data", n_labelled=150, n_test=20, seed=1)
    cfg = ExtractConfig(data=data, cache=root / "cache", text_model=tiny_models["text"], max_len=16,
                        image_model=TINY_IMAGE_MODEL, image_weights=tiny_models["image_weights"])
    extract.run(cfg, show_progress=False)
    return cfg.cache


RISKS = ("data loss", "code ran", "read outside", "wrong result", "poor")  # what a fault would do, unmended


@pytest.fixture
def outcome(record_property):
    """outcome(fault, how_it_ended, risk), called once the test has checked that nothing was lost
    (bench/faults.py counts these: a failing test is a fault that did what its risk says)."""

    def record(fault: str, ended: str, risk: str = "data loss") -> None:
        assert ended in ("identical", "clean error") and risk in RISKS
        record_property("fault", fault)
        record_property("outcome", ended)
        record_property("risk", risk)

    return record
