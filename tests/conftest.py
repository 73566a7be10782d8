"""Shared test setup: one intra-op thread (tiny tensors lose to thread start-up on 2 cores),
no wandb, no hub access, and the packaged MiniLM teacher loaded once per session."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def teacher():
    """The default teacher (the packaged all-MiniLM-L6-v2), frozen; shared read-only by the tests."""
    from elm.teacher import load_teacher

    return load_teacher()
