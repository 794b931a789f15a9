"""The staged trainer: for each stage build or grow the model, apply PEFT, shard, train, evaluate, checkpoint.

Read ``Trainer.run`` top to bottom; one training step is ``train_step``.
Growth operators and PEFT methods are plugins (steptitan/growth.py,
steptitan/peft.py); the validation loss is steptitan/evaluate.py's and the
rows of summary.json steptitan/summary.py's; everything else a step does is
in this file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.config.job_config import LRScheduler as LRSchedulerConfig
from torchtitan.distributed.utils import clip_grad_norm_

from steptitan.checkpoint import Checkpointer, CheckpointInfo, read_checkpoint
from steptitan import faults, stopping
from steptitan.data import BlockSampler, PreparedData
from steptitan.device import DTYPES, collect_garbage, compile_blocks, compute_dtype_name, drop_gradients
from steptitan.distributed import DistEnv, all_gather_object, reshard, shard_model
from steptitan.evaluate import block_losses
from steptitan.growth import SameShape
from steptitan.metrics import (
    cuda_peak_bytes,
    cuda_reserved_bytes,
    fmt_bytes,
    log,
    memory_breakdown,
    peak_rss_bytes,
    reset_peak_rss,
)
from steptitan.flops import stage_flops_per_token
from steptitan.optim import OptimizerHParams, StageLRSchedulers, build_stage_optimizers, resolve_assignment
from steptitan.model import cast_frozen_params, init_model_weights, init_units
from steptitan.peft import StepContext
from steptitan.plan import StagePlan, plan_fingerprint
from steptitan.progress import Progress, fmt_duration, shape_change
from steptitan.trackers import start_trackers
from steptitan.recipe import Recipe
from steptitan.summary import TRACKED, run_summary, stage_memory_scalars, stage_row, write_summary_json


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names stage and step."""




class Trainer:
    def __init__(self, recipe: Recipe, plans: list[StagePlan], data: PreparedData, env: DistEnv):
        self.recipe, self.plans, self.data, self.env = recipe, plans, data, env
        self.cfg = recipe.training
        self.run_dir = recipe.run_dir
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", env.rank, env.world_size, recipe.checkpoint.keep_last,
                                         dp_shard=env.dp_shard)
        self.metrics = start_trackers(recipe, env.is_main)  # TensorBoard, W&B (steptitan/trackers.py)
        self.progress = Progress(plans, [stage_flops_per_token(p, self.cfg.seq_len, self.cfg.activation_checkpointing).total
                                         for p in plans])  # elapsed time and ETAs (steptitan/progress.py)
        self.peft_counts: dict[str, float] = {}  # PEFT event counters at the last log step
        self.train_data = BlockSampler(data.tokens("train"), self.cfg.seq_len, self.cfg.seed)
        self.val_data = BlockSampler(data.tokens("val"), self.cfg.seq_len, self.cfg.seed, shuffle=False)
        # Counters saved in every checkpoint ("trainer state").
        self.samples_seen = 0  # global sequences consumed: the data position
        self.global_step = 0  # optimizer steps over all stages (TensorBoard x-axis)
        self.skipped_steps = 0  # steps whose update was dropped for a non-finite loss (training.skip_nonfinite)
        self.last_step_skipped = False
        self.step_lr = 0.0  # the LR the last optimizer step used (logged as "lr")
        self.stage_summaries: list[dict[str, Any]] = []
        self.stage_peak_memory: dict[str, int] = {}  # breakdown at this stage's largest model-state step
        self.stage_losses: list[float] = []  # per-step training loss of the current stage

    # ------------------------------------------------------------------ the stage loop

    def run(self) -> dict[str, Any]:
        faults.write_pid(self.env.rank)
        resume = self.find_resume()
        model: nn.Module | None = None
        prev: StagePlan | None = None
        for plan in self.plans:
            if resume is not None and plan.index < resume.stage:
                prev = plan
                continue
            reset_peak_rss()
            t0 = time.perf_counter()
            if resume is not None and plan.index == resume.stage:
                model = self.build_stage_model(plan, prev=prev, loaded=True)  # weights come from the checkpoint
                self.build_optimizer(plan, model)
                start_step = self.load_checkpoint(resume, plan, model)
                resume = None
            else:
                old_model, old_optimizer = model, getattr(self, "optimizer", None)
                # Free the old gradients (and the old moments unless growth copies them) before the new
                # model exists, so the two stages' model states do not add up (issue 23, item 6).
                copy_state = plan.growth is not None and plan.growth.carries_optimizer_state()
                drop_gradients(old_model, old_optimizer, optimizer_state=not copy_state)
                model = self.build_stage_model(plan, grow_from=old_model, prev=prev,
                                               init_from=self.recipe.model.init_from if plan.index == 0 else None)
                self.build_optimizer(plan, model)
                if plan.growth is not None and prev is not None:  # Adam moments across growth, per the operator's policy
                    reshard(old_model)
                    reshard(model)
                    plan.growth.carry_optimizer_state(old_model, old_optimizer, model, self.optimizer, prev.shape)
                drop_gradients(old_model, old_optimizer)  # the previous stage is done: free it now (docs/gpu.md)
                del old_model, old_optimizer
                collect_garbage()  # FSDP2 modules are reference cycles: nothing is freed until a collection
                start_step = 0
            log.info(f"== stage {plan.index} ({plan.name}): {plan.shape.n_layers} layers x dim {plan.shape.dim}, "
                     f"{plan.trainable_params:,} trainable / {plan.frozen_params:,} frozen params, steps {start_step}->{plan.steps}")
            tokens = self.train_stage(plan, model, start_step)
            self.end_stage(plan, model, wall=time.perf_counter() - t0, tokens=tokens)
            prev = plan
        summary = self.write_summary()
        self.metrics.close()
        return summary

    def find_resume(self) -> CheckpointInfo | None:
        mode = self.recipe.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":  # a damaged newest checkpoint is skipped, saying why (checkpoint_problem)
            info = self.checkpointer.latest_intact(warn=log.warning if self.env.is_main else None)
        else:
            info = read_checkpoint(Path(os.path.expanduser(mode)))  # validated before the process group (rundir.py)
        if info is not None:
            log.info(f"resuming from {info.path} (stage {info.stage}, step {info.step})")
        return info

    # ------------------------------------------------------------------ building a stage

    def build_stage_model(self, plan: StagePlan, grow_from: nn.Module | None = None, prev: StagePlan | None = None,
                          init_from: str | None = None, loaded: bool = False) -> nn.Module:
        """Meta model + PEFT -> FSDP2 -> materialise + init -> (HF weights | growth from the previous stage) -> PEFT init.

        ``init_from``: a Hugging Face Llama folder whose weights replace the random init (model.init_from;
        steptitan/hf.py), each rank reading only its shard's rows. The init skips what the load
        (``init_from``, ``loaded``: a checkpoint follows) or the growth fills (issue 23, item 7)."""
        model = plan.build()
        cast_frozen_params(model, DTYPES[self.cfg.frozen_dtype])  # the precision policy's frozen storage
        compute = DTYPES[compute_dtype_name(self.cfg.dtype, self.env.device.type)]  # "auto": bf16 on CUDA
        shard_model(model, self.env.mesh, compute, torch.float32, self.cfg.activation_checkpointing)
        if self.cfg.compile:  # after activation checkpointing, as torchtitan: compile(checkpoint(block))
            compile_blocks(model, self.cfg.compile_backend)
        model.to_empty(device=self.env.device)
        torch.manual_seed(self.cfg.seed + plan.index)
        filled = (set(init_units(plan.shape)) if loaded or init_from else
                  (plan.growth or SameShape()).filled_units(prev.shape) if grow_from is not None and prev is not None else ())
        init_model_weights(model, plan.shape, seed=self.cfg.seed + plan.index, filled=filled)  # any world size: same
        if init_from:
            from steptitan.hf import load_hf_weights

            t = time.perf_counter()
            n, nbytes = load_hf_weights(model, init_from, plan.shape)
            log.info(f"stage {plan.index} starts from {init_from}: {n} tensors, {fmt_bytes(nbytes)} read by rank "
                     f"{self.env.rank} in {time.perf_counter() - t:.2f}s")
        if grow_from is not None and prev is not None:
            reshard(grow_from)  # plugins read and write local shards; FSDP2 leaves the root unsharded after forward
            for method in prev.peft:  # fold the previous stage's adapters into its weights first
                method.merge(grow_from)
            if prev.growth is not None:  # and whatever the previous growth put on it (an MSG mask)
                prev.growth.merge(grow_from)
            t = time.perf_counter()
            grower = plan.growth or SameShape()
            reshard(model)
            grower.grow(grow_from, model, prev.shape)
            log.info(f"grew with {getattr(grower, 'registry_name', 'copy')} in {time.perf_counter() - t:.2f}s: "
                     f"{shape_change(prev.shape, plan.shape)}")
        if plan.growth is not None and prev is not None:  # grown or resumed: e.g. an MSG mask on the new blocks
            plan.growth.attach(model, prev.shape)
        reshard(model)
        with torch.no_grad():  # after growth: an adapter init may compensate the grown base weights (docs/peft.md)
            for method in plan.peft:
                method.init_weights(model)
        return model

    def build_optimizer(self, plan: StagePlan, model: nn.Module) -> None:
        """The stage's optimizers (one per plugin its groups are assigned, docs/optimizers.md) over
        trainable parameters only, run as one ``StageOptimizers``, with the stage's LR schedule."""
        hparams = OptimizerHParams(plan.lr, (self.cfg.beta1, self.cfg.beta2), self.cfg.eps, self.cfg.weight_decay)
        peft_choice = None
        for method in plan.peft:  # a method may need its own AdamW (SwitchLoRA: per-row step counts)
            peft_choice = method.optimizer_class(model) or peft_choice
        plugins = plan.optim or resolve_assignment([], plan.shape)
        self.optimizer = build_stage_optimizers(model, plugins, plan.param_group, hparams, peft_choice)
        if self.cfg.lr_schedule == "run":  # one warmup + decay over the whole run; this stage takes its slice
            total, offset = sum(p.steps for p in self.plans), sum(p.steps for p in self.plans[:plan.index])
            warmup, length = min(self.plans[0].warmup_steps, total), total
        else:  # a warmup + decay of this stage's own
            offset, warmup, length = 0, min(plan.warmup_steps, plan.steps), plan.steps
        sched_cfg = LRSchedulerConfig(warmup_steps=warmup, decay_type=self.cfg.decay_type,
                                      min_lr_factor=self.cfg.min_lr_factor)
        run_lambda = build_lr_schedulers(self.optimizer, sched_cfg, length).schedulers[0].lr_lambdas[0]

        def base_lambda(step: int) -> float:
            return run_lambda(offset + step)

        def lr_lambda(step: int) -> float:  # PEFT methods may reshape it (ReLoRA's jagged restarts)
            factor = base_lambda(step)
            for method in plan.peft:  # scheduler step ``step`` serves optimizer step step + 1 (1-based, as ctx.step)
                factor *= method.lr_factor(step + 1)
            return factor

        self.lr_schedulers = StageLRSchedulers(self.optimizer, lr_lambda)  # one schedule for all optimizers

    # ------------------------------------------------------------------ training

    def train_stage(self, plan: StagePlan, model: nn.Module, start_step: int) -> int:
        trainable = [p for p in model.parameters() if p.requires_grad]
        tokens_done = 0
        if start_step == 0:
            self.stage_losses = []  # on resume they come from the checkpoint
        self.step_time, self.step_time_tokens = 0.0, 0  # steady-state throughput: steps after the first
        self.peft_counts = {k: v for m in plan.peft for k, v in m.counters().items()}  # log_step prints changes
        for step in range(start_step + 1, plan.steps + 1):
            self.position = (plan.index, plan.name, step)  # for the Ctrl-C line (train.py)
            t = time.perf_counter()
            if plan.growth is not None:
                plan.growth.set_step(step)  # e.g. the MSG mask's 0 -> 1 ramp
            is_log_step = step % self.cfg.steps_per_log == 0 or step == start_step + 1 or step == plan.steps
            # Model-state sizes are fixed once the optimizer state exists (after the first
            # step), so counting them on the first two steps and on log steps is exact.
            measure = is_log_step or step <= start_step + 2
            loss, grad_norm, memory = self.train_step(plan, model, trainable, step, measure_memory=measure)
            if memory.get("model_states", 0) >= self.stage_peak_memory.get("model_states", 0):
                self.stage_peak_memory = memory
            self.global_step += 1
            faults.log_loss(plan.index, step, self.global_step, loss, self.last_step_skipped, self.env.rank)
            self.stage_losses.append(loss)
            dt = time.perf_counter() - t
            step_tokens = self.env.world_size * self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len
            tokens_done += step_tokens
            if step > start_step + 1:
                self.step_time += dt
                self.step_time_tokens += step_tokens
            if is_log_step:
                self.log_step(plan, step, loss, grad_norm, step_tokens / dt, memory)
            if self.cfg.eval_interval and step % self.cfg.eval_interval == 0 and step != plan.steps:
                self.evaluate(plan, model, step)
            interval = self.recipe.checkpoint.interval
            saved = self.recipe.checkpoint.enabled and interval and step % interval == 0 and step != plan.steps
            if saved:
                self.save_checkpoint(plan, model, step)
            self.stop_if_preempted(plan, model, step, saved)
            if step != plan.steps:  # the stage's last step pauses after its end-of-stage checkpoint (end_stage)
                faults.pause_point("step", plan.index, step, self.env.rank)
        return tokens_done

    def train_step(self, plan: StagePlan, model: nn.Module, trainable: list[nn.Parameter], step: int,
                   measure_memory: bool = True):
        """batch -> forward -> loss -> backward (x grad_accum) -> clip -> optimizer step.

        One host-device sync per step: the loss, the grad norm and the SIGTERM flag are read together
        in one ``tolist`` (issue 15, defect 4); everything else stays on the device, so the host can
        queue work ahead of it. With ``training.grad_sync = "last"`` FSDP2 reduce-scatters the
        gradients once per step, in the last micro-batch's backward (defect 5)."""
        model.train()
        self.optimizer.zero_grad()
        accum, device = self.cfg.grad_accum, self.env.device
        defer_sync = accum > 1 and self.cfg.grad_sync == "last"
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64, as the Python sum it replaces
        for k in range(accum):
            if defer_sync:  # earlier micro-batches accumulate unsharded gradients; the last one reduce-scatters
                model.set_requires_gradient_sync(k == accum - 1)
            inputs, labels = self.train_data.batch(self.samples_seen, self.env.rank, self.cfg.batch_size)
            self.samples_seen += self.env.world_size * self.cfg.batch_size
            # non_blocking: a pageable host->device copy is staged at once and does not wait for the stream
            logits = model(inputs.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device, non_blocking=True).flatten())
            if faults.inject_nan(plan.index, step, self.env.rank):  # tests only (STEPTITAN_INJECT_NAN)
                loss = loss * float("nan")
            (loss / accum).backward()
            loss_sum += loss.detach()
            del logits, loss  # else the logits live through the next micro-batch's forward (issue 23, item 6)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm_t = clip_grad_norm_(trainable, max_norm)  # already reduced over ranks; stays on the device
        # Gradients are alive now: the moment of peak model-state memory.
        memory = memory_breakdown(model, self.optimizer, [m.extra_state_bytes() for m in plan.peft]) if measure_memory else {}
        # torch.full, not torch.tensor: a fill kernel, not a host-to-device copy that would wait for the stream
        reduced = torch.stack([loss_sum / accum, torch.full((), stopping.sigterm_flag(), dtype=torch.float64, device=device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(reduced)
        loss_total, sigterms, grad_norm = torch.cat([reduced, grad_norm_t.detach().double().reshape(1)]).tolist()
        loss_avg = loss_total / self.env.world_size
        self.stop_agreed = sigterms > 0  # any rank got SIGTERM: every rank saves at this step's end
        # loss_avg and grad_norm are reduced over all ranks, so every rank takes the same branch.
        self.last_step_skipped = not (math.isfinite(loss_avg) and math.isfinite(grad_norm))
        if self.last_step_skipped:
            self.handle_nonfinite(plan, step, loss_avg, grad_norm)
        else:
            self.optimizer_step(plan, model, step)
        self.step_lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]  # this step's LR, logged by log_step
        self.lr_schedulers.step()  # from here get_last_lr() is the next step's LR
        return loss_avg, grad_norm, memory

    def optimizer_step(self, plan: StagePlan, model: nn.Module, step: int) -> None:
        """PEFT before-hooks -> optimizer step -> PEFT after-hooks: the stage's only optimizer step.

        Not called for a skipped (non-finite) step, so no hook sees a step that was not taken."""
        ctx = StepContext(step, model, self.optimizer, self.cfg.seed, plan.steps)
        reshard(model)  # hooks read and write this rank's shards
        for method in plan.peft:  # e.g. SwitchLoRA's counterpart freeze
            method.before_optimizer_step(ctx)
        self.optimizer.step()
        for method in plan.peft:  # e.g. ReLoRA's merge and restart, SwitchLoRA's switches
            method.after_optimizer_step(ctx)

    def handle_nonfinite(self, plan: StagePlan, step: int, loss: float, grad_norm: float) -> None:
        """Stop with a clear message, or drop this step's update (training.skip_nonfinite).

        Stopping happens before the optimizer step and before any checkpoint of
        this step, so the newest checkpoint on disk is the last good state.
        A skipped step keeps the weights and optimizer moments unchanged; the
        data position and the LR schedule still advance (the bad batch is not retried).
        """
        what = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                f"(loss {loss}, grad norm {grad_norm}) at stage {plan.index} ({plan.name}), step {step}")
        if self.skipped_steps >= self.cfg.skip_nonfinite:
            latest = self.checkpointer.latest()
            keep = (f"the last good checkpoint {latest.path} is kept; running again resumes from it"
                    if latest is not None else "no checkpoint had been written yet")
            budget = (f"already skipped {self.skipped_steps} step(s), the limit training.skip_nonfinite={self.cfg.skip_nonfinite}"
                      if self.cfg.skip_nonfinite else "set training.skip_nonfinite=N to skip up to N such steps")
            raise TrainingError(f"{what}; {keep}; {budget}")
        self.skipped_steps += 1
        self.optimizer.zero_grad()
        log.warning(f"skipping the update of step {step}: {what} "
                    f"({self.skipped_steps}/{self.cfg.skip_nonfinite} skips used)")

    def evaluate(self, plan: StagePlan, model: nn.Module, step: int, final: bool = False) -> float:
        """Mean validation loss over the fixed evaluation blocks, the same at any world size
        (steptitan/evaluate.py); logged to the console and the trackers. ``final``: the run's last
        evaluation, over ``final_eval_batches`` (0 = the whole split), keeping every block's loss."""
        batches = self.cfg.eval_batches
        if final and self.cfg.final_eval_batches is not None:
            batches = self.cfg.final_eval_batches
        losses = block_losses(model, self.val_data, self.cfg.batch_size, batches, self.env)
        val_loss = losses.mean().item()
        if final:
            self.final_block_losses = [round(x, 6) for x in losses.tolist()]
        self.metrics.scalars({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))}, self.global_step)
        log.info(f"[stage {plan.index}] step {step}: val loss {val_loss:.4f}, ppl {math.exp(min(val_loss, 50)):.2f}")
        return val_loss

    # ------------------------------------------------------------------ stage end, checkpoints, logs

    def end_stage(self, plan: StagePlan, model: nn.Module, wall: float, tokens: int) -> None:
        final = plan.index == len(self.plans) - 1
        val_loss = self.evaluate(plan, model, plan.steps, final=final)
        if self.recipe.checkpoint.enabled:
            self.save_checkpoint(plan, model, plan.steps)
        if self.recipe.metrics.sample_prompts:
            self.log_samples(plan, model)
        faults.pause_point("step", plan.index, plan.steps, self.env.rank)
        row = stage_row(plan, model, self.optimizer, self.env, self.cfg, losses=self.stage_losses, val_loss=val_loss,
                        wall=wall, tokens=tokens, step_time=self.step_time, step_time_tokens=self.step_time_tokens,
                        peak_step_memory=self.stage_peak_memory)  # a collective: gathers every rank's memory
        if final:  # every block's loss at the end (the benchmark bootstraps over blocks)
            row["val_block_losses"] = self.final_block_losses
        self.stage_summaries.append(row)
        for r in row["ranks"]:  # per-stage peaks (model states at the largest step, RSS, CUDA) in TensorBoard
            self.metrics.scalars(stage_memory_scalars(r), self.global_step)
        self.stage_peak_memory = {}

    def log_samples(self, plan: StagePlan, model: nn.Module) -> None:
        """metrics.sample_prompts at a stage end: every rank samples (steptitan/generate.py), rank 0 logs."""
        from steptitan.generate import stage_samples

        rows = stage_samples(model, self.data.tokenizer_dir, self.data.eos_id, self.recipe.metrics, self.cfg.seed,
                             plan.shape.max_seq_len, self.env.device)
        for prompt, text in rows:
            log.info(f"[stage {plan.index}] sample: {prompt + text!r}")
        self.metrics.samples(plan.index, self.global_step, rows)

    def log_step(self, plan: StagePlan, step: int, loss: float, grad_norm: float, tokens_per_s: float, memory: dict[str, int]) -> None:
        lr = self.step_lr  # the LR step ``step`` used (train_step reads it before the scheduler steps)
        rss = peak_rss_bytes()
        cuda = {"cuda_max_allocated": cuda_peak_bytes(), "cuda_max_reserved": cuda_reserved_bytes()} if self.env.device.type == "cuda" else {}
        per_rank = all_gather_object({**memory, "peak_rss": rss, **cuda})
        values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s * 1.0, "stage": plan.index,
                  "tokens_seen": self.samples_seen * self.cfg.seq_len}
        counts = {k: v for m in plan.peft for k, v in m.counters().items()}  # e.g. relora/resets (cumulative)
        values.update(counts)
        for r, mem in enumerate(per_rank):
            for k, v in mem.items():
                values[f"memory/rank{r}/{k}"] = v
        self.metrics.scalars(values, self.global_step)
        log.info(f"[stage {plan.index}] step {step:>5}/{plan.steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} "
                 f"| {tokens_per_s:,.0f} tok/s | model states {fmt_bytes(memory['model_states'])} | peak rss {fmt_bytes(rss)}"
                 + (f" | cuda {fmt_bytes(cuda['cuda_max_allocated'])} allocated, {fmt_bytes(cuda['cuda_max_reserved'])} reserved"
                    if cuda else "")
                 + self.progress.line(plan.index, step, self.seconds_per_step(tokens_per_s)))
        if counts != self.peft_counts:  # PEFT events since the last log line (SwitchLoRA switches, ReLoRA resets)
            log.info(f"[stage {plan.index}] peft since the last log: " + ", ".join(
                f"{k} +{v - self.peft_counts.get(k, 0):g} ({v:g} total)" for k, v in counts.items()))
            self.peft_counts = counts

    def seconds_per_step(self, tokens_per_s: float) -> float:
        """This stage's steady-state seconds per step (steps after its first), else the last step's."""
        step_tokens = self.env.world_size * self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len
        if self.step_time_tokens:
            return self.step_time * step_tokens / self.step_time_tokens
        return step_tokens / tokens_per_s if tokens_per_s > 0 else float("nan")

    def stop_if_preempted(self, plan: StagePlan, model: nn.Module, step: int, saved: bool) -> None:
        """SIGTERM on any rank: every rank saves this step's checkpoint, then leaves (steptitan/stopping.py)."""
        faults.step_boundary(plan.index, step, self.env.rank)
        if not getattr(self, "stop_agreed", False):  # the flag rode on this step's loss all-reduce (train_step)
            return
        if not self.recipe.checkpoint.enabled:
            raise stopping.Preempted(f"at stage {plan.index} ({plan.name}), step {step}; checkpoint.enabled=false, "
                                     f"so nothing was saved")
        if not saved:
            self.save_checkpoint(plan, model, step)
        path = self.checkpointer.root / f"stage{plan.index:02d}-step{step:06d}"
        raise stopping.Preempted(f"saved checkpoint {path} at stage {plan.index} ({plan.name}), step {step}; "
                                 f"run the same command to resume from it")

    def save_checkpoint(self, plan: StagePlan, model: nn.Module, step: int) -> None:
        reshard(model)
        peft_state = {str(i): m.state_dict() for i, m in enumerate(plan.peft)}
        t = time.perf_counter()
        path = self.checkpointer.save(plan.index, step, model, self.optimizer, self.lr_schedulers,
                                      self.trainer_state(), peft_state)
        if self.env.is_main:
            from steptitan.checkpoint import checkpoint_bytes

            log.info(f"checkpoint saved: {path} ({fmt_bytes(checkpoint_bytes(path))}, {time.perf_counter() - t:.1f}s)")

    def trainer_state(self) -> dict[str, Any]:
        return {"plan_fingerprint": plan_fingerprint(self.plans),
                "samples_seen": self.samples_seen, "global_step": self.global_step,
                "skipped_steps": self.skipped_steps, "stage_summaries": json.dumps(self.stage_summaries),
                "stage_losses": json.dumps(self.stage_losses),
                "elapsed_s": self.progress.elapsed()}  # wall time of the run so far, over all its launches

    def load_checkpoint(self, info: CheckpointInfo, plan: StagePlan, model: nn.Module) -> int:
        state = self.checkpointer.load(info, model, self.optimizer, self.lr_schedulers)
        trainer = state["trainer"]
        self.samples_seen = int(trainer["samples_seen"])
        self.global_step = int(trainer["global_step"])
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        self.stage_summaries = json.loads(trainer["stage_summaries"])
        self.stage_losses = json.loads(trainer.get("stage_losses", "[]"))
        self.progress.before = float(trainer.get("elapsed_s", 0.0))  # time after that checkpoint is lost
        for i, method in enumerate(plan.peft):
            method.load_state_dict(state["peft"].get(str(i), {}))
        return info.step

    def write_summary(self) -> dict[str, Any]:
        summary = run_summary(self.recipe, self.env, self.stage_summaries, self.progress.elapsed(),
                              self.samples_seen * self.cfg.seq_len)
        summary["train_text_tokens"] = len(self.train_data.tokens)  # passes over the text = tokens_seen / this
        self.metrics.summary({k: summary[k] for k in TRACKED})
        if self.env.is_main:
            path = write_summary_json(summary, self.run_dir)
            log.info(f"summary: final val loss {summary['final_val_loss']:.4f}, {summary['tokens_seen']:,} tokens in "
                     f"{fmt_duration(summary['wall_time_s'])} -> {path}")
        return summary
