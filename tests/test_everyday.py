"""Issue 16, items 1, 2 and 6 through the real entry points: trackers (W&B offline, TensorBoard),
progress lines, PEFT event lines, a library warning printed once, Ctrl-C, ``steptitan generate``.

One 2-rank torchrun run of a width-growth recipe (``run`` fixture) serves several tests; expected
values are computed here from the recipe (tokens, progress percentages, checkpoint sizes on disk),
and the W&B run is read back from its offline ``.wandb`` file with a reader written here.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, run_torchrun, wikitext_overrides, write_dist_info

PROMPTS = ["The history of", "In 1990 the"]
STEPS = (6, 6)
WORLD, BATCH, SEQ = 2, 4, 64


def run_args(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["recipes/width.toml", *wikitext_overrides(cache_dir), f"output_dir={run_dir}",
            f"training.seq_len={SEQ}", f"training.batch_size={BATCH}", "training.steps_per_log=3",
            "training.warmup_steps=2", "training.eval_batches=2", f"stages.0.steps={STEPS[0]}",
            f"stages.1.steps={STEPS[1]}", "checkpoint.interval=3", *extra]


def noisy_plugin(root: Path) -> Path:
    """An installed plugin package whose import warns, as e.g. bitsandbytes does, on every rank."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "noisy_lib.py").write_text(
        "import logging, warnings\n"
        "logging.getLogger('noisy_lib').warning('noisy_lib: optional kernels not found')\n"
        "warnings.warn('noisy_lib: this API is deprecated', UserWarning)\n")
    write_dist_info(root, "noisy-lib", "0.1", {"noisy": "noisy_lib"})
    return root


def wandb_env(tmp: Path) -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb-dir"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_DATA_DIR": str(tmp / "wandb-data")}


def have_wandb() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


NO_WANDB = "the wandb package is not installed (pip install -e '.[wandb]', or '.[test]' which includes it)"


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("everyday")
    run_dir = tmp / "run"
    plugin = noisy_plugin(tmp / "plugin")
    # Without wandb the run still serves the TensorBoard, progress, warning and generate tests
    # (metrics.wandb=true would be a recipe error); the W&B test then skips, saying why.
    wandb = ["metrics.wandb=true", "metrics.wandb_project=steptitan-test"] if have_wandb() else []
    t0 = time.monotonic()
    proc = run_torchrun(run_args(cache_dir, run_dir, *wandb,
                                 f"metrics.sample_prompts=[{','.join(PROMPTS)}]", "metrics.sample_tokens=8",
                                 "metrics.sample_temperature=0"),
                        env={**wandb_env(tmp), "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])},
                        timeout=1800)  # ~20 s on an idle 2-core machine
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr, wall


# --------------------------------------------------------------------------- reading W&B's offline file


def wandb_records(path: Path):
    """The protobuf records of a ``run-<id>.wandb`` file: W&B's LevelDB-log framing (a 7-byte
    ``:W&B`` header, 32 KiB blocks, records as crc32 / length / type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def read_wandb_run(run_dir: Path) -> dict:
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    out = {"config": {}, "history": [], "summary": {}, "run": None}
    for r in wandb_records(Path(files[0])):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    out["dir"] = Path(files[0]).parent
    return out


# --------------------------------------------------------------------------- item 1: trackers


@pytest.mark.dist  # reads the 2-rank torchrun run of the `run` fixture
@pytest.mark.skipif(not have_wandb(), reason=NO_WANDB)
def test_wandb_offline_run_has_recipe_metrics_samples_and_summary(run):
    run_dir, out, _ = run
    wb = read_wandb_run(run_dir)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert wb["run"].project == "steptitan-test" and wb["run"].display_name == "width"
    assert wb["run"].run_id == (run_dir / "wandb" / "run_id").read_text().strip()  # kept for a resume
    # the resolved recipe is the run config
    assert wb["config"]["training"]["seq_len"] == SEQ and wb["config"]["stages"][1]["growth"]["dim"] == 128
    assert {k: wb["config"][k] for k in recipe} == recipe
    # scalars at every log step: steps 1, 3, 6 of each stage at global steps 1, 3, 6, 7, 9, 12
    rows = {h["_step"]: h for h in wb["history"] if "loss" in h}
    assert sorted(rows) == [1, 3, 6, 7, 9, 12]
    per_step = WORLD * BATCH * SEQ
    assert all(rows[s]["tokens_seen"] == s * per_step for s in rows)
    # samples: one table per stage end, holding the prompts
    tables = [h for h in wb["history"] if "samples/stage1/_type" in h]
    assert len(tables) == 1 and tables[0]["samples/stage1/_type"] == "table-file"
    table = json.loads((wb["dir"] / "files" / tables[0]["samples/stage1/path"]).read_text())
    assert [row[2] for row in table["data"]] == PROMPTS
    # summary: the end-of-run values summary.json has
    assert wb["summary"]["wall_time_s"] == pytest.approx(summary["wall_time_s"])
    assert wb["summary"]["tokens_seen"] == summary["tokens_seen"] == sum(STEPS) * per_step
    assert wb["summary"]["final_val_loss"] == pytest.approx(summary["final_val_loss"])


@pytest.mark.dist  # reads the 2-rank torchrun run of the `run` fixture
def test_tensorboard_has_recipe_text_hparams_tokens_and_samples(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _, _ = run
    (events,) = (run_dir / "tb").glob("events.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == json.loads((run_dir / "recipe.json").read_text())
    start = [plugin_data_pb2.HParamsPluginData.FromString(v) for k, v in acc.PluginTagToContent("hparams").items()
             if k.endswith("session_start_info")][0].session_start_info.hparams
    assert start["stages.1.growth.dim"].number_value == 128 and start["stages.1.growth.name"].string_value == "bert2bert"
    assert start["training.lr"].number_value == pytest.approx(2e-3)
    seen = [(e.step, e.value) for e in acc.Scalars("tokens_seen")]
    assert seen == [(s, s * WORLD * BATCH * SEQ) for s in (1, 3, 6, 7, 9, 12)]
    samples = acc.Tensors("samples/stage0/text_summary")
    assert [e.step for e in samples] == [STEPS[0]]
    assert all(f"**{p}**" in samples[0].tensor_proto.string_val[0].decode() for p in PROMPTS)


# --------------------------------------------------------------------------- item 2: progress


@pytest.mark.dist  # reads the 2-rank torchrun run of the `run` fixture
def test_progress_checkpoint_growth_and_sample_lines(run):
    run_dir, out, wall = run
    total = sum(STEPS)
    for stage, step in ((0, 3), (0, 6), (1, 3), (1, 6)):
        done = sum(STEPS[:stage]) + step
        pattern = (rf"\[stage {stage}\] step +{step}/{STEPS[stage]} \|.* \| run {round(100 * done / total)}% \| "
                   rf"[0-9.hms]+ elapsed, ETA ({'stage [0-9.hms]+, run ' if stage == 0 else ''})[0-9.hms]+\n")
        assert re.search(pattern, out), (pattern, out[-3000:])
    for name in ("stage00-step000003", "stage00-step000006", "stage01-step000003", "stage01-step000006"):
        path = run_dir / "checkpoints" / name
        mib = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
        assert re.search(rf"checkpoint saved: {re.escape(str(path))} \({mib:.1f}MiB, [0-9.]+s\)\n", out), out[-3000:]
    assert "grew with bert2bert in " in out
    assert re.search(r"grew with bert2bert in [0-9.]+s: dim 64 -> 128, heads 2 -> 4, kv heads 2 -> 4, "
                     r"FFN 176 -> 352, 2 layers\n", out), out[-3000:]
    for stage in (0, 1):
        assert sum(f"[stage {stage}] sample: '{p}" in out for p in PROMPTS) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 < summary["wall_time_s"] < wall and summary["tokens_seen"] == total * WORLD * BATCH * SEQ


@pytest.mark.dist  # reads the 2-rank torchrun run of the `run` fixture
def test_a_library_warning_is_printed_once_not_once_per_rank(run):
    _, out, _ = run
    assert out.count("noisy_lib: optional kernels not found") == 1, out[:3000]
    assert out.count("UserWarning: noisy_lib: this API is deprecated") == 1, out[:3000]  # (+ its source line)


def test_peft_events_are_logged(tmp_path, cache_dir):
    """ReLoRA resets (a line each, and per log interval) and SwitchLoRA switch counts per log interval,
    in one process; totals checked against the PEFT state saved in the checkpoint."""
    import torch

    def train(name: str, peft: str) -> tuple[str, Path]:
        run_dir = tmp_path / name
        args = [str(REPO / "recipes" / "vanilla.toml"), *wikitext_overrides(cache_dir),
                f"output_dir={run_dir}", "training.seq_len=32", "training.batch_size=2", "training.steps_per_log=2",
                "training.eval_batches=1", "stages.0.steps=4", "training.warmup_steps=1", f"stages.0.peft={peft}"]
        code, out = in_process(["train", *args])  # what `steptitan train` prints, without a process start
        assert code == 0, out[-3000:]
        return out, run_dir / "checkpoints" / "stage00-step000004"

    out, ckpt = train("relora", "{method: relora, rank: 4, reset_interval: 2, restart_warmup_steps: 0}")
    assert re.search(r"relora: reset 1 after step 2: B A merged into W on \d+ linears", out), out[-3000:]
    assert "relora: reset 2 after step 4" in out
    assert "[stage 0] peft since the last log: relora/resets +1 (1 total)" in out
    assert "[stage 0] peft since the last log: relora/resets +1 (2 total)" in out
    assert torch.load(ckpt / "extra-rank0.pt", weights_only=False)["peft"]["0"]["resets"] == 2

    out, ckpt = train("switchlora", "{method: switchlora, rank: 4, interval0: 1}")
    deltas = [(int(a), int(b)) for a, b in re.findall(r"switchlora/switches \+(\d+) \((\d+) total\)", out)]
    assert 1 <= len(deltas) <= 3, out[-3000:]  # at most log steps 1, 2, 4; only those with switches
    assert all(d > 0 and sum(d for d, _ in deltas[:i + 1]) == total for i, (d, total) in enumerate(deltas))
    saved = torch.load(ckpt / "extra-rank0.pt", weights_only=False)["peft"]["0"]["switches"]
    assert deltas[-1][1] == saved > 0


# --------------------------------------------------------------------------- item 2: Ctrl-C


def ctrl_c(cmd: list[str], run_dir: Path, after_step: int = 4) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` in its own process group and send SIGINT to the whole group, as a terminal's Ctrl-C does."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if f"step {after_step:>5}/" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=600)
    return proc, "".join(lines) + rest


def interrupted_lines(out: str, run_dir: Path) -> list[re.Match]:
    # Ctrl-C reaches every rank; whichever handles it first says so (rank 1 under load), the others are quiet.
    pattern = (r"steptitan: interrupted \(Ctrl-C / SIGINT\) on rank \d+ during stage 0 \(narrow\), step (\d+); "
               rf"newest checkpoint: ({re.escape(str(run_dir))}/checkpoints/stage00-step\d+); run the same command")
    return list(re.finditer(pattern, out))


@pytest.mark.slow  # issue 23 item 10: the same one line from the same handler (stopping.reports_interrupt) is checked
# fast through torchrun by test_ctrl_c_to_steptitan_train_nproc_prints_only_that_line (torchrun in-process, 2 ranks, Ctrl-C
# to the group) and test_reliability.py::test_ctrl_c_on_one_rank_reaches_peers_and_prints_one_line
@pytest.mark.dist
def test_ctrl_c_to_torchrun_prints_one_line(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "steptitan.train", *run_args(cache_dir, run_dir, "stages.0.steps=500", "training.steps_per_log=1")]
    proc, out = ctrl_c(cmd, run_dir)
    assert proc.returncode != 0
    found = interrupted_lines(out, run_dir)
    assert len(found) == 1 and out.count("steptitan: interrupted") == 1, out[-3000:]
    assert int(found[0].group(1)) >= 4 and Path(found[0].group(2)).is_dir()
    assert "/steptitan/" not in "".join(line for line in out.splitlines() if line.lstrip().startswith("File "))


@pytest.mark.dist
def test_ctrl_c_to_steptitan_train_nproc_prints_only_that_line(tmp_path, cache_dir):
    """``steptitan train --nproc-per-node 2``: the same job without torchrun's own traceback and warnings."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "steptitan.cli", "train", "--nproc-per-node", "2",
           *run_args(cache_dir, run_dir, "stages.0.steps=500", "training.steps_per_log=1")]
    proc, out = ctrl_c(cmd, run_dir)
    assert proc.returncode == 130, out[-3000:]
    assert len(interrupted_lines(out, run_dir)) == 1, out[-3000:]
    after = out[out.index("steptitan: interrupted"):]
    assert after.strip().count("\n") == 0, after  # nothing after the one line: no traceback, no torchrun notices


# --------------------------------------------------------------------------- item 6: generate


def in_process(argv: list[str]) -> tuple[int, str]:
    """``steptitan ARGV`` run by the console command's entry point in this process: (exit code, stdout + stderr).
    Issue 23 item 10: a subprocess per call only added ~10-15 s of imports (the entry point is the same)."""
    import contextlib
    import io

    from steptitan.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main(argv)
    return code, buf.getvalue()


def generate(*args: str) -> subprocess.CompletedProcess:
    """``steptitan generate ARGS`` in this process (cli.main), its stdout and stderr kept apart."""
    import contextlib
    import io

    from steptitan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", *args])
    return subprocess.CompletedProcess(["steptitan", "generate", *args], code, out.getvalue(), err.getvalue())


@pytest.mark.dist  # reads the 2-rank torchrun run of the `run` fixture
def test_generate_from_run_matches_a_reference_greedy_loop_and_the_stage_end_samples(run):
    import torch

    from steptitan.export import find_checkpoint, find_tokenizer, load_merged_model, recipe_for

    run_dir, out, _ = run
    texts = []
    for prompt in PROMPTS:
        proc = generate(str(run_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8")
        assert proc.returncode == 0, proc.stderr
        assert "stage01-step000006" in proc.stderr  # the run's newest checkpoint
        assert proc.stdout.startswith(prompt)
        texts.append(proc.stdout)
    # reference: argmax of the full-context logits, token by token, written here
    info = find_checkpoint(run_dir)
    recipe = recipe_for(info)
    plan, model = load_merged_model(recipe, info)  # what generate samples: the adapters merged, as export writes
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(find_tokenizer(recipe)))
    eos = tok.token_to_id("<|endoftext|>")
    for prompt, text in zip(PROMPTS, texts):
        ids = [eos] + tok.encode(prompt).ids
        new = []
        with torch.no_grad():
            for _ in range(8):
                new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
        new = new[:new.index(eos)] if eos in new else new
        assert text.rstrip("\n") == prompt + tok.decode(new)
        # the 2-rank FSDP2 model sampled the same greedy text at the end of stage 1
        assert f"[stage 1] sample: {text.rstrip(chr(10))!r}" in out


@pytest.mark.dist  # reads the 2-rank torchrun run of the `run` fixture
def test_generate_sampling_is_seeded_and_reads_any_checkpoint(run):
    run_dir, _, _ = run
    ckpt = run_dir / "checkpoints" / "stage00-step000003"
    common = [str(ckpt), "--prompt", "The", "--max-new-tokens", "6", "--temperature", "1.0", "--top-k", "20"]
    a, b = generate(*common, "--seed", "1"), generate(*common, "--seed", "1")
    assert a.returncode == 0, a.stderr
    assert "stage 0 'narrow', step 3; 2 layers, dim 64" in a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The")
    bad = generate(str(run_dir / "nope"), "--prompt", "x")
    assert bad.returncode == 2 and bad.stderr.startswith("steptitan generate: error:"), bad.stderr


# --------------------------------------------------------------------------- units


def test_progress_units():
    from types import SimpleNamespace

    from steptitan.model import ModelShape
    from steptitan.progress import Progress, fmt_duration, shape_change

    assert [fmt_duration(s) for s in (9.44, 42, 75, 3725, float("nan"))] == ["9.4s", "42s", "1m15s", "1h02m", "?"]
    p = Progress([SimpleNamespace(steps=10), SimpleNamespace(steps=20), SimpleNamespace(steps=5)], [1.0, 3.0, 2.0])
    assert p.fraction(1, 5) == 15 / 35
    stage_left, run_left = p.etas(1, 5, step_time=0.5)  # 15 steps of this stage, then 5 steps at 2/3 the cost
    assert stage_left == 7.5 and math.isclose(run_left, 7.5 + 5 * 0.5 * 2 / 3)
    a = ModelShape(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=100, ffn_hidden=176)
    assert shape_change(a, a.replace(n_layers=4)) == "layers 2 -> 4"
    assert shape_change(a, a.replace(dim=128, n_heads=4, n_kv_heads=4, ffn_hidden=352, fixed_head_dim=32)) == \
        "dim 64 -> 128, heads 2 -> 4, kv heads 2 -> 4, FFN 176 -> 352, 2 layers"


def test_tracker_and_launcher_units():
    from steptitan.launch import split_nproc
    from steptitan.trackers import flatten

    assert flatten({"a": {"b": 1, "c": None}, "s": [{"x": [1, 2]}, {}], "e": {}}) == \
        {"a.b": 1, "a.c": "null", "s.0.x": "[1, 2]", "s.1": "{}", "e": "{}"}
    assert split_nproc(["r.toml", "--nproc-per-node", "2", "a=1"]) == (2, ["r.toml", "a=1"])
    assert split_nproc(["--nproc_per_node=3", "r.toml"]) == (3, ["r.toml"])
    assert split_nproc(["r.toml"]) == (None, ["r.toml"])
    with pytest.raises(ValueError):
        split_nproc(["r.toml", "--nproc-per-node", "0"])
