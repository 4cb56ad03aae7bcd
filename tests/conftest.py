"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n 2``), share the cores between the workers: each worker's torch and
    every subprocess it starts (bundle CLIs inherit the environment) get ``cores // workers`` threads. Two workers
    with two OpenMP threads each on 2 cores oversubscribe them, and spinning OpenMP barriers then cost far more than
    the second thread gains (see ``one_thread``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 2:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


#: The slowest test modules, longest first (pytest --durations on the 2-core machine: 240, 166, 106, 71, 69, 37 ... s
#: of the suite's ~840). Under pytest-xdist they are collected first, and the Makefile turns off xdist's reordering by
#: test count, so each starts at the beginning of the run instead of leaving one worker alone with a two-minute module
#: at the end (a longest-first schedule). In one process the order is left as it is.
SLOW_MODULES_FIRST = (
    "test_benchmarks_smoke.py",
    "test_export.py",
    "test_bundle.py",
    "test_ablation_e2e.py",
    "test_qwen_fast_path.py",
    "test_tracking.py",
    "test_flow_matching.py",
    "test_checkpoint_atomic.py",
    "test_bundle_dca1.py",
    "test_flow_objective.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint folder (model, tokenizer, processor), built offline once per session."""
    from tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen") / "model")


#: The tiny 2D flow network the core tests share: x_t ⊕ image in, velocity out; FiLM off unless a test says otherwise.
TINY_FLOW_NET = dict(
    spatial_dims=2,
    in_channels=2,
    out_channels=1,
    channels=(8, 16, 16),
    attention_levels=(False, False, False),
    num_res_blocks=1,
    norm_num_groups=8,
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on this 2-core machine, with other processes running, two OpenMP threads made these
    small CPU workloads up to ~10x slower in wall and CPU time (barrier spinning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
