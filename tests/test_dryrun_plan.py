"""`steptitan train --dry-run` and `steptitan plan`, through the console command's entry point
(``steptitan.cli.main`` with the same argv, in this process: a subprocess would only add ~10-15 s of
imports per call, issue 23 item 10; ``python -m steptitan`` itself is started by test_prepare / test_sweep).

Expected numbers are computed here from parameter counts and the bytes-per-parameter rule
(fp32 AdamW: 4 B weight + 4 B gradient + 8 B moments per trainable parameter, 4 B per frozen
fp32 parameter), not by steptitan's memory model.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess

from conftest import REPO

STEP = REPO / "recipes" / "step.toml"


def cli(*args: str) -> subprocess.CompletedProcess:
    """``steptitan ARGS``: exit code, stdout and stderr of the console command, run in this process."""
    from steptitan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse errors and --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return subprocess.CompletedProcess(["steptitan", *args], code, out.getvalue(), err.getvalue())


def table(out: str, first_header: str) -> tuple[list[str], list[str]]:
    """(header line, the rows under it) of the text table whose header starts with ``first_header``."""
    lines = out.splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = []
    for line in lines[k + 1:]:
        if not line.strip() or line.startswith(" "):  # sub-lines ("  new layers: ...") are not table rows
            if not line.strip():
                break
            continue
        rows.append(line)
    return lines[k], rows


def cells(line: str) -> list[tuple[int, int, str]]:
    """Cells of a table line: runs of text separated by two or more spaces, with their spans."""
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", line)]


def assert_aligned(header: str, rows: list[str], right: set[str]) -> None:
    """Every row has one cell per column, each under its header: left-aligned cells start where the
    header does, right-aligned ones end where it ends. A value too wide for its column breaks this."""
    heads = cells(header)
    for row in rows:
        got = cells(row)
        assert len(got) == len(heads), (header, row)
        for (hs, he, name), (cs, ce, text) in zip(heads, got):
            assert (ce == he) if name in right else (cs == hs), f"column {name!r}: {text!r} is out of place\n{header}\n{row}"


def test_dry_run_shows_peft_options_and_memory_vs_vanilla_in_aligned_columns(tmp_path):
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe

    long_name = "a-rather-long-first-stage-name"
    overrides = ["stages.1.peft.rank=4", "stages.1.peft.alpha=12", "stages.1.peft.dropout=0.05",
                 f"stages.0.name={long_name}", "model.dim=64", "training.seq_len=32"]
    proc = cli("train", str(STEP), "--dry-run", *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert '"output_dir"' not in out and "--dry-run --json" in out  # the JSON only behind its flag
    header, rows = table(out, "stage ")
    assert_aligned(header, rows, right={"layers", "dim", "steps", "trainable", "frozen", "states/rank", "vs vanilla"})
    assert "lora[2L] rank=4 alpha=12 dropout=0.05" in rows[1] and rows[0].startswith(long_name)

    plans = build_plan(load_recipe(STEP, overrides))
    vanilla = 16 * plans[-1].shape.num_params()  # one rank, fp32 AdamW, every parameter trained
    for row, plan in zip(rows, plans):
        states = 16 * plan.trainable_params + 4 * plan.frozen_params
        assert row.split()[-1] == f"{states / vanilla:.2f}x", row
    mem_header, mem_rows = table(out.split("predicted memory per rank", 1)[1], "stage")
    assert_aligned(mem_header, mem_rows, right=set(cells(mem_header)[k][2] for k in range(1, 8)))
    assert [r.split()[0] for r in mem_rows] == [long_name, "grown", "(vanilla)"] and mem_rows[-1].endswith("1.00x")

    # --json: the resolved recipe alone on stdout; a missing data file is an error (exit 2), an existing one is not
    missing = cli("train", str(STEP), "--dry-run", "--json", *overrides, f"data.files=[{tmp_path / 'nope.txt'}]",
                  f"data.val_files=[{STEP}]")
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert json.loads(missing.stdout)["stages"][1]["peft"]["alpha"] == 12
    assert f"steptitan: error: data.files: '{tmp_path / 'nope.txt'}' does not exist" in missing.stderr
    assert "val_files" not in missing.stderr


def lora_params_per_block(dim: int, ffn: int, rank: int) -> int:
    """LoRA r (in + out) on wq, wk, wv, wo (dim x dim, no GQA) and w1, w3 (dim -> ffn), w2 (ffn -> dim)."""
    return rank * (4 * 2 * dim + 3 * (dim + ffn))


def test_plan_echoes_what_changes_its_answer_and_labels_its_columns():
    base = ["plan", "--dim", "64", "--layers", "4", "--heads", "2", "--vocab", "300", "--ffn", "96", "-K", "2",
            "--seq-len", "16", "--peft-opt", "rank=4"]
    plain = cli(*base)
    assert plain.returncode == 0, plain.stderr[-2000:]
    out = plain.stdout
    assert f"E(P) = {lora_params_per_block(64, 96, 4):,} trainable adapter (PEFT) parameters per frozen old block" in out
    assert "split = new layers per stage" in out and "PEFT on old layers: lora rank=4" in out
    assert "embeddings/head: trained in every stage" in out and "optimizer: adamw" in out
    header, rows = table(out, "#  split")
    assert_aligned(header, rows, right={"#", "peak states", "vs vanilla", "+ acts"})

    frozen = cli(*base, "--freeze-embeddings-after", "1", "--embed-lora-rank", "2", "--optim", "head=adam_mini")
    assert frozen.returncode == 0, frozen.stderr[-2000:]
    assert "embeddings/head: frozen from stage 1 with lora_embed rank=2" in frozen.stdout
    assert "optimizer: " in frozen.stdout and "head adam_mini" in frozen.stdout
    assert table(frozen.stdout, "#  split")[1] != rows  # the echoed settings are the ones that moved the numbers


def test_plan_with_a_recipe_uses_its_peft_and_dtype_and_says_what_it_ignores(tmp_path):
    """The recipe's own split row equals what --dry-run predicts for the recipe, stage by stage."""
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[model]
dim = 64
n_layers = 2
n_heads = 2
vocab_size = 300
ffn_hidden = 96
[training]
seq_len = 16
batch_size = 2
dtype = "bfloat16"
frozen_dtype = "bfloat16"
[[stages]]
steps = 5
[[stages]]
steps = 5
lr = 1e-4
growth = { name = "interpolate", n_new = 1, position = "upper" }
peft = { method = "lora", layers = "old", rank = 3, alpha = 6 }
freeze = ["old", "embeddings", "head"]
extra_peft = [{ method = "lora_embed", rank = 2 }]
[[stages]]
steps = 5
growth = { name = "interpolate", n_new = 1, position = "upper" }
peft = { method = "lora", layers = "old", rank = 3, alpha = 6 }
freeze = ["old", "embeddings", "head"]
extra_peft = [{ method = "lora_embed", rank = 2 }]
optim = { default = "adamw" }
""")
    proc = cli("plan", "--recipe", str(recipe), "--top", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = re.sub(r"\n    ", " ", proc.stdout)  # unwrap the long lines
    assert "stages: 3" in out and "precision: paper (bfloat16 compute, bfloat16 frozen weights" in out
    assert "PEFT on old layers: lora rank=3 alpha=6" in out
    assert "embeddings/head: frozen from stage 1 with lora_embed rank=2" in out
    assert "not used from --recipe: steps, learning rates" in out and "per-stage optim tables" in out
    header, rows = table(out, " #  split")
    star = next(r for r in rows if r.split()[0].endswith("*"))
    assert star.split()[1:4] == ["[2,", "1,", "1]"]

    plans = build_plan(load_recipe(recipe))
    dry = cli("train", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    _, dry_rows = table(dry.stdout, "stage ")
    states = [r.split()[-2] for r in dry_rows]  # states/rank
    planned = [c.split("/") for c in cells(star)[-1][2].split(" | ")]
    assert [p[0].strip() for p in planned] == states
    assert [int(p[1].replace(",", "")) for p in planned] == [p.trainable_params for p in plans]
    default = cli("plan", "--recipe", str(recipe), "--top", "1", "--peft-opt", "rank=8")
    assert "flags over the recipe: --peft-opt" in default.stdout and "lora rank=8 alpha=6" in default.stdout
