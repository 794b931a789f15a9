"""``steptitan bench --parts throughput``: steptitan's vanilla against a bare FSDP2 loop on the bench shape,
interleaved over rounds, then one run alternating their steps in the same processes (docs/benchmark.md)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from steptitan.experiments import runner
from steptitan.experiments.report import read_summary
from steptitan.experiments.spec import Run, resolved_recipe


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThroughputError(RuntimeError):
    """A throughput run failed; the message names its log."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_throughput(args: argparse.Namespace, shape: Any, over: dict[str, Any], van: Path) -> dict[str, Any]:
    """Interleaved steptitan-vanilla / bare-FSDP2 runs of the shape's final model, then one alternating-step run."""
    from steptitan.data import prepare_data
    from steptitan.experiments.spec import recipe_toml
    from steptitan.recipe import recipe_from_dict

    folder = Path(args.runs).resolve() / "throughput"
    folder.mkdir(parents=True, exist_ok=True)
    data_dict = resolved_recipe(Run("t", {}, over, recipe=van, base_dir=Path.cwd()))
    recipe = recipe_from_dict(data_dict)
    data = prepare_data(recipe.data, recipe.model.vocab_size)
    t = recipe.training
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world_size}"]
    bare = ["-m", "steptitan.experiments.bare_fsdp", "--tokens", str(data.train_path), "--dtype", data.dtype,
            "--dim", str(shape.dim), "--layers", str(shape.layers), "--heads", str(shape.heads), "--vocab", str(shape.vocab),
            "--ffn", str(shape.ffn), "--batch", str(shape.batch), "--seq-len", str(shape.seq_len), "--lr", str(t.lr)]
    out: dict[str, Any] = {"steptitan": [], "bare": [], "bare_runs": []}
    for k in range(args.throughput_rounds):
        for which in (["bare", "steptitan"] if k % 2 == 0 else ["steptitan", "bare"]):
            if which == "bare":
                res_path = folder / f"bare_{k}.json"
                cmd = [*launcher, f"--master_port={_free_port()}", *bare, "--steps", str(args.throughput_steps),
                       "--out", str(res_path)]
                code, wall = runner.run_logged(cmd, folder / f"bare_{k}.log", folder)
                res = json.loads(res_path.read_text()) if code == 0 else None
                if res is None:
                    raise ThroughputError(f"bare FSDP2 run failed; see {folder / f'bare_{k}.log'}")
                res.update(wall_s=wall, command=" ".join(cmd))
                out["bare"].append(res["tokens_per_s"])
                out["bare_runs"].append(res)
            else:
                run_folder = folder / f"steptitan_{k}"
                toml = folder / f"steptitan_{k}.toml"
                toml.write_text(recipe_toml({**data_dict, "output_dir": str(run_folder), "stages": [
                    {**data_dict["stages"][0], "steps": args.throughput_steps}]} | {"training": {
                        **data_dict["training"], "eval_batches": 1, "steps_per_log": 1000}}))
                cmd = [*launcher, f"--master_port={_free_port()}", "-m", "steptitan.train", str(toml)]
                code, _ = runner.run_logged(cmd, folder / f"steptitan_{k}.log", folder)
                if code != 0:
                    raise ThroughputError(f"steptitan throughput run failed; see {folder / f'steptitan_{k}.log'}")
                out["steptitan"].append(read_summary(run_folder)["stages"][0]["step_tokens_per_s"])
            log(f"throughput round {k} {which}: {out[which][-1]:,.0f} tok/s")
    if args.ab_steps:
        toml = folder / "ab.toml"
        toml.write_text(recipe_toml({**data_dict, "output_dir": str(folder / "ab_steptitan")}))
        res_path = folder / "ab.json"
        cmd = [*launcher, f"--master_port={_free_port()}", *bare, "--steps", str(args.ab_steps), "--out", str(res_path),
               "--ab", str(toml)]
        code, wall = runner.run_logged(cmd, folder / "ab.log", folder)
        if code != 0:
            raise ThroughputError(f"alternating-step run failed; see {folder / 'ab.log'}")
        out["ab"] = {**json.loads(res_path.read_text()), "wall_s": wall, "command": " ".join(cmd)}
        log(f"throughput A/B: steptitan {out['ab']['steptitan_tokens_per_s']:,.0f} vs bare {out['ab']['tokens_per_s']:,.0f} tok/s")
    return out
