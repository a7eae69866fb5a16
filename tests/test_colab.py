"""The Colab journey's set-up, checked offline: what gets installed into a live kernel, GPU metadata, no-GPU stop."""

import json
import re
from pathlib import Path

import pytest

from course_utils import colab
from course_utils.presets import NoGPURuntime, Runtime, detect_preset, get_preset

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KERNEL = {"ipykernel", "ipython", "jupyter-client", "jupyter-core", "jupyter", "notebook", "tornado", "pyzmq",
          "traitlets", "comm", "debugpy"}
CI_TOOLS = {"pytest", "nbval", "papermill", "playwright", "nbclient", "nbconvert", "nbformat"}
COLAB_OWN = {"torch", "numpy", "pandas", "matplotlib", "pyarrow"}  # never pinned into a live kernel
GPU_LESSONS = {"01", "04", "05", "06", "07"}  # they train or sample


def _requirements(path):
    names = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[=<>!~\[ ]", line)[0].lower().replace("_", "-")
            names[name] = line
    return names


def test_colab_requirements_hold_no_kernel_ci_or_colab_stack_packages():
    colab_reqs = _requirements(ROOT / "requirements-colab.txt")
    assert colab_reqs, "requirements-colab.txt is empty"
    assert not set(colab_reqs) & KERNEL, set(colab_reqs) & KERNEL
    assert not set(colab_reqs) & CI_TOOLS, set(colab_reqs) & CI_TOOLS
    assert not set(colab_reqs) & COLAB_OWN, set(colab_reqs) & COLAB_OWN


def test_colab_requirements_pin_what_ci_tests():
    """Same versions as the full environment, so Colab runs what CI ran; and the libraries the course needs."""
    full = _requirements(ROOT / "requirements.txt")
    colab_reqs = _requirements(ROOT / "requirements-colab.txt")
    for name, line in colab_reqs.items():
        assert full.get(name) == line, (name, line, full.get(name))
    assert {"transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"} <= set(colab_reqs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_setup_cell_installs_the_colab_file_and_says_when_to_restart(path):
    setup = "".join(json.loads(path.read_text())["cells"][1]["source"])
    assert "requirements-colab.txt" in setup and "requirements.txt" not in setup
    assert "restart_notice(before)" in setup and setup.index("installed_versions()") < setup.index("%pip")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_lessons_that_train_or_sample_ask_colab_for_a_gpu(path):
    meta = json.loads(path.read_text())["metadata"]
    if path.name[:2] in GPU_LESSONS:
        assert meta.get("accelerator") == "GPU" and meta["colab"]["gpuType"] == "T4"
    else:
        assert "accelerator" not in meta  # lessons 2 and 3 run on any runtime


def test_restart_notice_only_when_an_imported_package_changed(monkeypatch):
    import pytest as imported  # certainly imported here

    before = colab.installed_versions()
    assert before.get("pytest") == imported.__version__
    assert "no restart needed" in colab.restart_notice(before)
    stale = {**before, "pytest": "0.0.1"}  # as if the install had replaced the pytest this kernel imported
    notice = colab.restart_notice(stale)
    assert notice.startswith("RESTART NEEDED") and f"pytest 0.0.1 -> {imported.__version__}" in notice


def test_auto_on_colab_without_a_gpu_stops_with_how_to_switch():
    with pytest.raises(NoGPURuntime, match="Change runtime type"):
        detect_preset(Runtime(cuda=False, colab=True))
    assert get_preset("cpu").name == "cpu"  # PRESET = "cpu" still works on purpose
    t4 = Runtime(cuda=True, device_name="Tesla T4", capability=(7, 5), memory_gb=15.0, colab=True)
    assert detect_preset(t4).name == "t4"
