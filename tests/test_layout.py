"""The repository's top-level folders never shadow an installed package for Python started at the root.

``python -m pytest`` (and any ``python`` run from a clone) puts the working directory first on
``sys.path``. A top-level folder with an ``__init__.py`` there is a regular package that wins over an
installed one of the same name: the ``kernels/`` folder once hid Hugging Face's ``kernels``, which
transformers imports, and broke every diffusers import at the root.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import ditcache.kernels
import ditcache.pipelines

REPO = Path(__file__).resolve().parents[1]
# Folders whose code lives one folder down (`src/`, mapped to `ditcache.<name>` in pyproject.toml).
MAPPED_ONE_DOWN = ("kernels", "pipelines")


def top_level_folders() -> list[str]:
    result = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    return sorted({name.split("/")[0] for name in result.stdout.split("\0") if "/" in name and not name.startswith(".")})


def test_diffusers_and_transformers_import_from_the_repository_root():
    assert importlib.metadata.version("kernels")  # the package the folder used to hide (a test dependency)
    script = (
        "import kernels, sys\n"
        "from kernels import CUDAProperties\n"
        "from diffusers import AutoencoderKL, FluxTransformer2DModel\n"
        "from transformers import CLIPTextModel, T5EncoderModel\n"
        "print(kernels.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not Path(result.stdout.strip()).resolve().is_relative_to(REPO / "kernels")


def test_no_top_level_folder_is_a_regular_package_that_shadows_an_installed_one():
    folders = top_level_folders()
    assert {"kernels", "pipelines", "eval", "tests"} <= set(folders)
    for name in MAPPED_ONE_DOWN:
        assert not (REPO / name / "__init__.py").exists(), name
    installed = importlib.metadata.packages_distributions()
    regular = [name for name in folders if (REPO / name / "__init__.py").exists()]
    # `ditcache` is the package itself; `eval` stays regular for its documented data paths (eval/configs,
    # eval/reference_models), so no installed distribution may bring a top-level `eval`.
    assert regular == ["ditcache", "eval"]
    clashes = {name: installed[name] for name in regular if set(installed.get(name, ["ditcache"])) != {"ditcache"}}
    assert not clashes, f"installed distributions provide top-level modules named like a repository folder: {clashes}"


def test_the_mapped_folders_import_as_ditcache_subpackages_from_anywhere(tmp_path):
    # Under the editable install the suite runs on, the finder maps them to the checkout's `src/` folders.
    assert Path(ditcache.kernels.__file__) == REPO / "kernels" / "src" / "__init__.py"
    assert Path(ditcache.pipelines.__file__) == REPO / "pipelines" / "src" / "__init__.py"
    script = "import ditcache.kernels, ditcache.pipelines, ditcache.eval; from ditcache.pipelines import ToCaPipeline"
    for cwd in (REPO, tmp_path):
        result = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
