"""Measure what ReLoRA's optimizer-state pruning does to A at a reset (issue 11, item 1; docs/peft.md).

Runs a recipe in this process (1 rank) and reports, for every ReLoRA reset at
step N: how many A entries are left with exp_avg != 0 and exp_avg_sq == 0,
|A|_F (all adapters together) after step N's update, after the re-draw, and
after step N+1's update; the training loss and grad norm at steps N..N+2; and
the final validation loss.

    .venv/bin/python tools/relora_reset_probe.py recipes/relora.toml [--old-pruning] [key=value ...]

``--old-pruning`` replaces the pruning with the pre-fix one (independent masks
for exp_avg and exp_avg_sq), to reproduce the blow-up.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from steptitan.distributed import full_tensor, local_tensor
from steptitan.peft import optimizer_state
from steptitan.registry.peft import relora as relora_mod
from steptitan.registry.peft.lora import lora_modules


@torch.no_grad()
def independent_masks_reset(state, mode, ratio, gen):
    """The pre-fix pruning: each moment pruned by its own mask (the hazard of issue 11)."""
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            continue
        if mode == "full":
            local_tensor(state[key]).zero_()
        else:
            local_tensor(state[key]).masked_fill_(relora_mod.prune_mask(state[key], mode, ratio, gen), 0.0)
    if mode == "full" and "step" in state:
        local_tensor(state["step"]).zero_()


def a_norm(model) -> float:
    return sum(float(full_tensor(m.lora_A).float().pow(2).sum()) for _, m in lora_modules(model)) ** 0.5


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):  # the recipe's own options are steptitan train's
        print(f"usage: tools/relora_reset_probe.py RECIPE.toml [--old-pruning] [key=value ...]\n\n{__doc__}")
        raise SystemExit(0 if argv else 2)
    old = "--old-pruning" in argv
    args = [a for a in argv if a != "--old-pruning"]
    if old:
        relora_mod.reset_adapter_state = independent_masks_reset
    record: dict = {"pruning": "independent masks (old)" if old else "current", "steps": {}, "resets": []}
    orig_reset, orig_after = relora_mod.ReLoRA.reset, relora_mod.ReLoRA.after_optimizer_step

    def reset(self, model, optimizer, step):
        before = a_norm(model)
        orig_reset(self, model, optimizer, step)
        hazard = total = 0
        for _, m in lora_modules(model):
            s = optimizer_state(optimizer, m.lora_A)
            if s:
                ea, eas = full_tensor(s["exp_avg"]), full_tensor(s["exp_avg_sq"])
                hazard += int(((ea != 0) & (eas == 0)).sum())
                total += ea.numel()
        record["resets"].append({"step": step, "A_entries_m_nonzero_v_zero": hazard, "A_entries": total,
                                 "A_norm_after_step": before, "A_norm_after_redraw": a_norm(model)})

    def after(self, ctx):
        record["steps"].setdefault(ctx.step, {})["A_norm"] = a_norm(ctx.model)
        orig_after(self, ctx)

    relora_mod.ReLoRA.reset, relora_mod.ReLoRA.after_optimizer_step = reset, after
    from steptitan import trainer as trainer_mod

    orig_step = trainer_mod.Trainer.train_step

    def train_step(self, plan, model, trainable, step, measure_memory=True):
        loss, gnorm, mem = orig_step(self, plan, model, trainable, step, measure_memory)
        if plan.peft:
            record["steps"].setdefault(step, {}).update(loss=loss, grad_norm=gnorm)
        return loss, gnorm, mem

    trainer_mod.Trainer.train_step = train_step
    from steptitan.train import main as train_main

    with tempfile.TemporaryDirectory() as out:
        rc = train_main([*args, f"output_dir={out}/run", "checkpoint.enabled=false", "overwrite=true"])
        summary = json.loads(open(f"{out}/run/summary.json").read()) if rc == 0 else {}
    for r in record["resets"]:
        n = r["step"]
        r["A_norm_after_next_step"] = record["steps"].get(n + 1, {}).get("A_norm")
        r["loss"] = {s: record["steps"].get(s, {}).get("loss") for s in (n, n + 1, n + 2)}
        r["grad_norm"] = {s: record["steps"].get(s, {}).get("grad_norm") for s in (n, n + 1, n + 2)}
    print(json.dumps({"pruning": record["pruning"], "resets": record["resets"],
                      "final_val_loss": summary.get("final_val_loss")}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
