import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/diffusers are imported: never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from ditcache.eval import builders

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory):
    """Tiny pipelines written with save_pretrained, so tests load them with from_pretrained."""
    root = tmp_path_factory.mktemp("pipelines")
    builders.dit_pipeline(root / "dit")
    builders.pixart_pipeline(root / "pixart_alpha")
    builders.pixart_pipeline(root / "pixart_sigma", sigma=True)
    builders.flux_pipeline(root / "flux")
    return root


@pytest.fixture
def dit_pipe(saved_pipelines):
    from diffusers import DiTPipeline

    return DiTPipeline.from_pretrained(saved_pipelines / "dit")


@pytest.fixture(params=["pixart_alpha", "pixart_sigma"])
def pixart_pipe(request, saved_pipelines):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(saved_pipelines / request.param)


@pytest.fixture
def flux_pipe(saved_pipelines):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(saved_pipelines / "flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def stand_in_vbench(tmp_path, monkeypatch):
    """Install a stand-in ``vbench`` package whose ``__init__.py`` is the given source, importable by the
    child process that ``run_official_vbench`` starts."""

    def install(source: str) -> None:
        package = tmp_path / "fake" / "vbench"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(source)
        monkeypatch.setenv("PYTHONPATH", str(package.parent))

    return install


def pytest_collection_modifyitems(items):
    """The notebooks (run by nbmake) are long tests too: ``pytest -m "not slow"`` leaves them out."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
