"""Shared test helpers: real multi-process gloo groups, torchrun launches, tiny shapes.

* ``run_distributed(fn, world_size, **kwargs)`` runs ``fn(env, **kwargs)`` in
  ``world_size`` spawned processes with a real gloo process group and returns
  the list of per-rank return values (exceptions are re-raised with the rank).
  ``fn`` must be a module-level function of a test module.
* ``run_torchrun(args, nproc)`` launches ``torchrun -m steptitan.train`` and
  returns the CompletedProcess.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

from hypothesis import HealthCheck, settings, strategies as st

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2"

# Hypothesis profiles: "ci" (the default run) and "dev" (quick local loops).
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # the CI machine has 2 cores; tests may run 2 ranks at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from steptitan.distributed import init_distributed, shutdown_distributed

    result: Any = ("error", "the process group did not start")
    try:
        env = init_distributed("gloo", timeout_s=120)
        try:
            result = ("ok", fn(env, **kwargs))
        except BaseException:  # noqa: BLE001 - re-raised in the parent with the rank
            result = ("error", traceback.format_exc())
        # Ranks that finished tear down together (a barrier first): a rank destroying its gloo group while
        # a peer is still in the last collective's teardown can abort at exit ("terminate called without
        # an active exception", seen once in CI); steptitan.distributed.shutdown_distributed says the same.
        shutdown_distributed(synchronize=result[0] == "ok")
    except BaseException:  # noqa: BLE001 - the start or the teardown failed (a failed peer breaks the barrier)
        if result[0] == "ok":
            result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)


def run_distributed(fn: Callable, world_size: int = 2, **kwargs) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, kwargs, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        results, errors = [], []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as fh:
                status, value = pickle.load(fh)
            if status == "error":  # every failed rank: a peer's broken barrier must not hide the cause
                errors.append(f"rank {rank} failed:\n{value}")
            results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 600, env: dict | None = None,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "steptitan.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


def dense(shape, seed: int) -> torch.nn.Module:
    """A dense model of ``shape`` (a ``ModelShape``) on CPU, initialised by torchtitan's init after seeding."""
    from steptitan.model import build_model, init_model_weights

    torch.manual_seed(seed)
    model = build_model(shape, device="cpu")
    init_model_weights(model)
    return model


def dense_every_block_matters(shape, seed: int) -> torch.nn.Module:
    """A model whose every block matters: torchtitan's init makes branch outputs tiny next to the
    embeddings, which would hide a wrong block; here linears are N(0, 1/fan_in) and norms 1 + noise."""
    model = dense(shape, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p is not model.tok_embeddings.weight:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


@st.composite
def model_shapes(draw, head_dims=(2, 4, 6), kv_heads=(1, 2), group=(1, 2), layers=(1, 2), vocab=(8, 40), ffn=(3, 24)):
    """Random small shapes, GQA included (n_heads = n_kv_heads x group); each argument is a choice or an
    inclusive range. Heads and KV heads of 1 occur."""
    from steptitan.model import ModelShape

    head_dim = draw(st.sampled_from(list(head_dims)))
    n_kv = draw(st.integers(*kv_heads))
    n_heads = n_kv * draw(st.integers(*group))
    return ModelShape(dim=n_heads * head_dim, n_layers=draw(st.integers(*layers)), n_heads=n_heads, n_kv_heads=n_kv,
                      vocab_size=draw(st.integers(*vocab)), ffn_hidden=draw(st.integers(*ffn)), max_seq_len=16)


def write_dist_info(root: Path, name: str, version: str, entry_points: dict[str, str]) -> Path:
    """An installed-looking distribution's metadata: ``root/<name>-<version>.dist-info`` with
    METADATA and an entry_points.txt declaring ``entry_points`` in the steptitan plugin group.
    Put ``root`` on sys.path and call ``steptitan.registry.reset_for_tests()`` to discover it."""
    from steptitan.registry import ENTRY_POINT_GROUP

    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    return info


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token/tokenizer cache for the whole session (tokenizing once saves minutes)."""
    return tmp_path_factory.mktemp("steptitan-cache")


def wikitext_overrides(cache: Path) -> list[str]:
    """Recipe overrides that train on WikiText-2 valid and evaluate on its test split."""
    if not WIKITEXT.is_dir():
        pytest.skip(f"{WIKITEXT} is missing (../shared/data/wikitext-2 must sit beside the repo)")
    return [f"data.files=[{WIKITEXT / 'valid.txt'}]", f"data.val_files=[{WIKITEXT / 'test.txt'}]",
            f"data.cache_dir={cache}", "data.max_chars=300000"]
