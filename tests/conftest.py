"""Shared fixtures: tiny random models for fast tests, the real default model for slow ones,
and the path of ../shared/data (tests that need it skip with a reason where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# fixed terminal width for Rich output in CLI tests
os.environ.setdefault("COLUMNS", "120")
os.environ.setdefault("TERMINAL_WIDTH", "120")
os.environ.setdefault("NO_COLOR", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: present in development and CI, absent in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout (only development machines and CI have it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama with a ChatML tokenizer, shared by the fast tests (do not mutate)."""
    from steerkit.testing import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from steerkit.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random model saved as a Hugging Face folder, for CLI tests (`--model DIR`)."""
    from steerkit.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_hf_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
