"""Fixtures for the model family tests: demo checkpoints built once per session, loaded the real way."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.demo import ensure_checkpoint


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    # GENQ_TEST_MODEL_DIR (as in tests/conftest.py) keeps the checkpoints between runs.
    return Path(os.environ.get("GENQ_TEST_MODEL_DIR") or tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="session")
def text_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:text", demo_dir)


@pytest.fixture(scope="session")
def image_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:image", demo_dir)


@pytest.fixture(scope="session")
def image_xl_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:image-xl", demo_dir)


@pytest.fixture(scope="session")
def audio_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:audio", demo_dir)


@pytest.fixture(scope="session")
def video_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:video", demo_dir)


@pytest.fixture(scope="session")
def vision_text_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:vision-text", demo_dir)


@pytest.fixture(scope="session")
def digits_checkpoint(demo_dir) -> str:
    return ensure_checkpoint("demo:digits", demo_dir)


@pytest.fixture(scope="session")
def text_model(text_checkpoint):
    from models import text

    return text.load(text_checkpoint, "cpu", "float32")


@pytest.fixture(scope="session")
def image_model(image_checkpoint):
    from models import image

    return image.load(image_checkpoint, "cpu", "float32")


class Progress:
    """Records on_progress calls per row."""

    def __init__(self):
        self.calls: dict[int, list[tuple[int, int]]] = {}

    def __call__(self, row: int, current: int, total: int) -> None:
        self.calls.setdefault(row, []).append((current, total))


@pytest.fixture
def progress():
    return Progress()
