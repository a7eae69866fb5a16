"""Shared fixtures: the real tokenizer, the tiny model, and the tiny preset's sentiment pairs.

Everything here is offline. The sentiment pairs are sampled once from SmolLM2 (about a
minute on 2 cores) and cached on disk, so later runs reuse them.
"""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TQDM_DISABLE", "1")

# A fake Hub token in the environment for the whole session, as a learner with HF_TOKEN set would
# have it: test_safety.py scans every executed notebook for it (nothing may print a token).
FAKE_HF_TOKEN = "hf_FAKEcourseTESTtoken0123456789abcdefXYZ"
os.environ["HF_TOKEN"] = FAKE_HF_TOKEN


@pytest.fixture(scope="session")
def tokenizer():
    from course_utils.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_preset():
    from course_utils.presets import get_preset

    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_pairs(tiny_preset):
    """(DatasetDict(train, test), held_out_openings, reports) for the tiny preset."""
    from course_utils.sentiment import sentiment_dataset

    return sentiment_dataset(tiny_preset)


@pytest.fixture(scope="session")
def course_dir(tmp_path_factory):
    """One OUTPUT_DIR shared by the notebook tests, so later lessons find earlier lessons' adapters."""
    return tmp_path_factory.mktemp("course")


@pytest.fixture(scope="session")
def run_lesson(course_dir):
    """Execute lesson ``number`` with papermill on the tiny preset; returns its recorded results."""
    from course_utils.lessons import execute_lesson, lesson_paths

    def run(number: str, **parameters):
        path = lesson_paths([number])[0]
        params = {"PRESET": "tiny", "OUTPUT_DIR": str(course_dir), **parameters}
        return execute_lesson(path, course_dir, params, html=False)

    return run


@pytest.fixture(scope="session")
def lesson_04(run_lesson):
    """Lesson 4 run once on tiny; lessons 5 and 6 use the adapter it saves."""
    return run_lesson("04")


@pytest.fixture
def one_thread():
    """The tiny model's matrices are too small to share between threads; one thread is faster (and what the notebook uses)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
