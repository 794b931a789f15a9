"""Reliability without launching ranks: checkpoint folder states, keep_last, data and output-folder errors.

Every bad input must end in ONE ``steptitan: error: ...`` line and exit code 2
before any process group starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn

from conftest import REPO
from steptitan.checkpoint import Checkpointer, list_checkpoints
from steptitan.train import main as train_main


class _Stateless:
    def state_dict(self):
        return {}


def _save(ck: Checkpointer, stage: int, step: int) -> Path:
    model = nn.Linear(4, 4)
    return ck.save(stage, step, model, _Stateless(), _Stateless(), {"samples_seen": step}, {})


def test_keep_last_and_interrupted_save_states(tmp_path):
    root = tmp_path / "checkpoints"
    ck = Checkpointer(root, rank=0, world_size=1, keep_last=2)
    for step in (1, 2, 3):
        _save(ck, 0, step)
    assert [c.step for c in list_checkpoints(root)] == [2, 3]
    # A torn save (no meta.json) and a torn delete are ignored, then cleaned by the next save.
    (root / ".tmp-stage00-step000004").mkdir()
    (root / ".del-stage00-step000001").mkdir()
    (root / "stage00-step000009").mkdir()  # the right name but never completed (no meta.json)
    assert ck.latest().step == 3
    # Killed between the two renames of a re-save: the .old- copy still counts.
    (root / "stage00-step000003").rename(root / ".old-stage00-step000003")
    assert ck.latest().path.name == ".old-stage00-step000003"
    _save(ck, 0, 3)  # re-saving the same step swaps atomically
    assert sorted(p.name for p in root.iterdir()) == ["stage00-step000002", "stage00-step000003", "stage00-step000009"]
    _save(ck, 1, 1)
    assert [(c.stage, c.step) for c in list_checkpoints(root)] == [(0, 3), (1, 1)]
    assert json.loads((root / "stage01-step000001" / "meta.json").read_text())["samples_seen"] == 1
    assert not dist.is_initialized()


def _run(capsys, *args: str) -> tuple[int, str]:
    code = train_main([str(REPO / "recipes" / "step.toml"), *args])
    return code, capsys.readouterr().err


def _small(tmp_path: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300",
            "training.seq_len=16", "training.batch_size=2", *extra]


@pytest.mark.parametrize("case", ["missing file", "empty corpus", "shorter than one block", "unreadable tokenizer",
                                  "no tokenizer", "unsupported type"])
def test_data_errors_are_one_clear_message(tmp_path, capsys, case):
    text = tmp_path / "a.txt"
    text.write_text("word " * 400)
    extra = {
        "missing file": [f"data.files=[{tmp_path / 'nope.txt'}]"],
        "empty corpus": [f"data.files=[{tmp_path / 'empty.txt'}]"],
        "shorter than one block": [f"data.files=[{text}]", "training.seq_len=100000"],
        "unreadable tokenizer": [f"data.files=[{text}]", f"data.tokenizer={tmp_path / 'tok'}"],
        "no tokenizer": [f"data.files=[{text}]", f"data.tokenizer={tmp_path}"],
        "unsupported type": [f"data.files=[{tmp_path / 'a.docx'}]"],
    }[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a.docx").write_text("x")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{ this is not json")
    code, err = _run(capsys, *_small(tmp_path, *extra))
    needle = {"missing file": "does not exist", "empty corpus": "corpus is empty",
              "shorter than one block": "larger than the training data can fill",
              "unreadable tokenizer": "unreadable", "no tokenizer": "no tokenizer.json",
              "unsupported type": "unsupported type"}[case]
    assert code == 2 and needle in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # datasets may print progress bars
    assert len(errors) == 1 and errors[0].startswith("steptitan: error:") and "Traceback" not in err, err
    assert not dist.is_initialized()


def test_output_folder_is_never_reused_silently(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("someone else's results")
    text = tmp_path / "a.txt"
    text.write_text("word " * 400)
    code, err = _run(capsys, *_small(tmp_path, f"data.files=[{text}]"))
    assert code == 2 and "already holds a run" in err and (run_dir / "notes.txt").exists()
    (run_dir / "checkpoints" / "stage00-step000001").mkdir(parents=True)
    code, err = _run(capsys, *_small(tmp_path, f"data.files=[{text}]", "checkpoint.resume=never"))
    assert code == 2 and "checkpoint.resume=never" in err and (run_dir / "notes.txt").exists()


def test_cgroup_memory_limit_is_the_machines_ram_in_a_container(tmp_path):
    """A container / Slurm job sees the host's RAM in /proc/meminfo but is OOM-killed at its cgroup's limit."""
    from steptitan.train import cgroup_memory_limit

    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/42\n")  # cgroup v2
    (tmp_path / "fs" / "job" / "42").mkdir(parents=True)
    (tmp_path / "fs" / "job" / "42" / "memory.max").write_text("4294967296\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) == 4 << 30
    (tmp_path / "fs" / "job" / "42" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) is None
    proc.write_text("4:memory:/docker/abc\n0::/\n")  # cgroup v1 (no limit = a number near 2^63)
    (tmp_path / "fs" / "memory" / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "fs" / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("2147483648\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) == 2 << 30
    (tmp_path / "fs" / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) is None
    assert cgroup_memory_limit(str(tmp_path / "missing")) is None


def test_embedded_corpus_streams_its_documents(monkeypatch):
    """The embedded corpus yields its first docstring after parsing a file or two, not the whole standard
    library (~30 s), so data preparation's progress lines flow from the start (issue 12: 30 s of silence)."""
    import ast

    from steptitan.corpus import corpus_docs
    from steptitan.recipe import DataConfig

    parsed: list[int] = []
    real_parse = ast.parse
    monkeypatch.setattr(ast, "parse", lambda *a, **k: parsed.append(1) or real_parse(*a, **k))
    docs = corpus_docs(DataConfig())  # no files, no hub: the embedded stdlib-docs corpus
    assert len(next(docs)) > 40
    assert len(parsed) < 20, f"{len(parsed)} modules parsed before the first document"


def test_no_disk_space_anywhere_in_training_is_named_exit_3(tmp_path, capsys, monkeypatch):
    """ENOSPC outside a checkpoint's shards (summary.json, meta.json, TensorBoard, ...) is the same clear
    disk-space message and exit 3 as in a checkpoint save, not a traceback (issue 12, defect 6: in every case)."""
    import errno

    from steptitan import trainer

    def disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "summary.json"))

    monkeypatch.setattr(trainer.Trainer, "run", disk_full)
    text = tmp_path / "a.txt"
    text.write_text("some words of text and more words. " * 300)
    code, err = _run(capsys, *_small(tmp_path, f"data.files=[{text}]"))
    assert code == 3 and "not enough disk space" in err and "No space left on device" in err, err
    assert str(tmp_path / "run") in err and "Traceback" not in err, err
    assert not dist.is_initialized()
