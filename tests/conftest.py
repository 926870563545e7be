"""Shared fixtures: a tiny CNN trained in seconds on Fashion-MNIST, exported as a real .pt2."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


class TinyNet(nn.Module):
    """conv+BN, a depthwise conv, a grouped conv, a 1x1 conv and two linears: every layer kind we support."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(16 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw(torch.relu(self.grouped(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def export_model(model: nn.Module, path: Path, example=None, dynamic: bool = True) -> Path:
    model.eval()
    example = example if example is not None else (torch.randn(2, 1, 28, 28),)
    shapes = {"x": {0: torch.export.Dim.DYNAMIC}} if dynamic else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))
    return path


@pytest.fixture(scope="session")
def fmnist():
    from search.data import fashion_mnist_splits

    return fashion_mnist_splits(calib_size=256)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, fmnist) -> Path:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    train = fmnist.train
    for i in range(0, 12800, 128):
        loss = nn.functional.cross_entropy(model(train.inputs[i : i + 128]), train.labels[i : i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Non-trivial BN statistics so that folding is really exercised.
    model.train()
    with torch.no_grad():
        for i in range(0, 2048, 256):
            model(train.inputs[i : i + 256])
    return export_model(model, tmp_path_factory.mktemp("tiny") / "tiny.pt2")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from search.model import load_model

    return load_model(tiny_model_path)


@pytest.fixture(scope="session")
def tiny_sim(tiny_model, fmnist):
    from search.simulate import Simulator

    return Simulator(tiny_model, fmnist.calib.inputs)


def reference_model(name: str) -> Path:
    path = MODELS / f"{name}.pt2"
    if not path.exists():
        pytest.fail(f"{path} is missing; run `make models` (models/train.py) to create it")
    return path


@contextmanager
def embedded_service(var: Path, **env: str):
    """The API on a fresh SQLite database in `var` with BITSEARCH_* exactly `env` (plus VAR_DIR and a memory broker,
    so queueing succeeds and no worker takes a job), run in this process: (settings, TestClient, keys of alice
    and bob). The caller's BITSEARCH_* environment is restored afterwards."""
    import os

    from fastapi.testclient import TestClient

    from store.settings import get_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("BITSEARCH_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(BITSEARCH_VAR_DIR=str(var), BITSEARCH_BROKER_URL="memory://", **env)
    get_settings.cache_clear()
    try:
        from api.main import create_app
        from store.auth import create_key
        from store.db import session_scope

        settings = get_settings()
        app = create_app()  # migrates the fresh database before the keys are written
        with session_scope(settings.resolved_database_url()) as db:
            keys = {owner: create_key(db, owner) for owner in ("alice", "bob")}
        with TestClient(app) as client:
            yield settings, client, keys
    finally:
        for k in [k for k in os.environ if k.startswith("BITSEARCH_")]:
            del os.environ[k]
        os.environ.update(saved)
        get_settings.cache_clear()
