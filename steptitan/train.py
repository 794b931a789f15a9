"""Entry point: ``torchrun --nproc_per_node=N -m steptitan.train RECIPE.toml [key=value ...]``.

Also runs as a single process (``python -m steptitan.train ...``). Order of
work: read the recipe's TOML and overrides and check the run folder (a finished
run, a lock held by another run) -- with the standard library alone, so such a
refusal comes in seconds, not after torch, torchtitan and the stage plans
(10-40 s on a loaded machine); then validate the recipe, resolve the stage plan,
prepare data -- all before any process group exists, so a bad recipe costs one
clear message and no hung ranks -- then start the process group and train.
Torch and the model stack are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from steptitan.corpus import DataError
from steptitan.recipe import Recipe, RecipeError, load_recipe, load_recipe_dict, parallel_degrees

if TYPE_CHECKING:
    from steptitan.plan import StagePlan


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="steptitan train",
        description="Run a steptitan recipe. Trailing key=value pairs override recipe keys "
        "(OmegaConf dot-list: training.seq_len=64 stages.1.peft.rank=16).",
    )
    parser.add_argument("recipe", help="path to a TOML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe and its data files; print the stage plan and predicted memory, then exit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the full resolved recipe as JSON instead")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to predict memory for in --dry-run (default: torchrun's WORLD_SIZE, else 1)")
    return parser.parse_intermixed_args(argv)  # options may come after key=value overrides and vice versa


def resolve(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Recipe, list[StagePlan]]:
    from steptitan.plan import build_plan

    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    plans = build_plan(recipe)
    return args, recipe, plans


# Process exit codes (docs/reliability.md).
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # recipe, data or output-folder problem, found before any process group starts
EXIT_TRAINING = 3  # training stopped on purpose (a non-finite loss, a full disk); the last good checkpoint is kept
EXIT_PEER_FAILED = 4  # another rank died or hung (watchdog) or a collective failed
# 1 = an unexpected error (Python traceback); 5 = preempted (SIGTERM, checkpoint saved) and
# 130 = interrupted (Ctrl-C / SystemExit, no save): steptitan/stopping.py


_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a number near 2^63


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), None if none.

    A container, Slurm job or Kubernetes pod sees the host's RAM in /proc/meminfo
    but is OOM-killed at its cgroup's limit, so that limit is the machine's RAM here.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            candidates += [Path(root, path, "memory.max"), Path(root, "memory.max")]
        elif "memory" in controllers.split(","):
            candidates += [Path(root, "memory", path, "memory.limit_in_bytes"), Path(root, "memory", "memory.limit_in_bytes")]
    for f in candidates:
        try:
            value = f.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < _NO_LIMIT:
            return int(value)
        if value == "max" or value.isdigit():
            return None
    return None


def machine_memory_bytes(backend: str = "auto") -> tuple[int, str]:
    """(bytes, what) one rank may use at most: its GPU's memory (nccl), else this host's RAM (/proc/meminfo,
    or the cgroup's memory limit when lower), shared by the ranks on the host, and at most the process's
    address-space limit (``ulimit -v``)."""
    import resource

    import torch

    from steptitan.device import pick_device

    device, _ = pick_device(backend, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"GPU {props.name} has {props.total_memory / 2**30:.1f} GiB"
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
        total = kib * 1024
    except (OSError, StopIteration, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    what = f"this machine has {total / 2**30:.1f} GiB RAM"
    cgroup = cgroup_memory_limit()
    if cgroup is not None and cgroup < total:
        total, what = cgroup, f"this process's cgroup (container / job) may use {cgroup / 2**30:.1f} GiB RAM"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks on this host share its RAM
    limit = total // local
    if local > 1:
        what += f", shared by {local} ranks on this host"
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY and address_space < limit:
        limit, what = address_space, f"this process has an address-space limit (ulimit -v) of {address_space / 2**30:.1f} GiB"
    return limit, what


def check_memory_fits(recipe: Recipe, plans: list[StagePlan]) -> None:
    """Refuse, before anything is allocated, a stage whose predicted per-rank memory exceeds the machine's.

    Uses the planner's model (steptitan/memory.py: model states exact, activations
    estimated), so e.g. ``model.dim=1048576`` or a LoRA rank of 100000 is one
    clear message instead of minutes of swapping or an OOM kill.
    """
    from steptitan.distributed import env_world_size
    from steptitan.memory import predict_recipe
    from steptitan.metrics import fmt_bytes

    try:
        limit, what = machine_memory_bytes(recipe.training.backend)
    except ValueError as exc:  # backend = "nccl" on a machine without a GPU
        raise RecipeError(str(exc)) from None
    for stage in predict_recipe(recipe, plans, env_world_size()):
        if stage.peak_total > limit:
            raise RecipeError(
                f"stage {stage.index} ({stage.name}) needs about {fmt_bytes(stage.peak_total)} per rank "
                f"(model states {fmt_bytes(stage.peak_model_states)} + activations {fmt_bytes(stage.activations)} "
                f"+ buffers {fmt_bytes(stage.peak_overheads)}; "
                f"{stage.trainable_params:,} trainable / {stage.frozen_params:,} frozen parameters) but {what}; "
                f"shrink the model (model.dim, n_layers, a PEFT rank), the batch, or shard over more ranks (parallel.dp_shard) "
                f"(see `steptitan train RECIPE --dry-run`)")


def refuse_early(args: argparse.Namespace, rank: int) -> int | None:
    """The run folder's checks from the raw recipe (TOML + overrides), before torch, torchtitan and the plans.

    Returns the exit code when this launch stops here, else None: a recipe that cannot be read
    (file, TOML, an override) is exit 2; a finished run "already finished", exit 0 on every rank
    (rank 0 says it); a folder whose lock another run holds is exit 2 (rank 0 probes: rank 0 alone
    takes the lock, later, in rundir.prepare_run_dir -- the lock, not this probe, lets one run in).
    ``--dry-run`` touches no folder. What the raw recipe cannot tell (a value of the wrong type) is
    left to the full validation.
    """
    from steptitan.run_lock import RunDirError, finished_text, lock_holder, run_folder_of

    try:
        data = load_recipe_dict(args.recipe, args.overrides)
        folder = None if args.dry_run else run_folder_of(data)
        if folder is None:
            return None
        finished = finished_text(folder.run_dir, folder.name, folder.overwrite, folder.stage_steps)
        if finished:  # every rank: torchrun does not stop peers of a rank exiting 0
            if rank == 0:
                print(f"steptitan: {finished}", file=sys.stderr)
            return EXIT_OK
        busy = lock_holder(folder.run_dir) if rank == 0 else None
        if busy:
            raise RunDirError(busy)
    except RecipeError as exc:
        print(f"steptitan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from steptitan import stopping

    rank = int(os.environ.get("RANK", "0"))
    stopping.install_sigterm_handler()  # SIGTERM before the process group: exit at once, code 5
    stopping.install_sigint_once()
    try:
        refused = refuse_early(parse_args(argv), rank)  # seconds: nothing heavy is imported yet
        if refused is not None:
            return refused
        from steptitan.metrics import setup_logging

        setup_logging(rank, verbose=False)  # before plugins load: a library's import-time warning is shown by rank 0 only
        from steptitan import rundir
        from steptitan.data import check_data_fits, prepare_data
        from steptitan.distributed import env_world_size

        args, recipe, plans = resolve(argv)
        if args.dry_run:  # steptitan/dryrun.py; exit 2 when a data file is missing
            from steptitan.dryrun import dry_run

            return dry_run(recipe, plans, args.world_size or env_world_size(), args.json) if rank == 0 else 0
        finished = rundir.finished_message(recipe)  # the typed recipe's answer (refuse_early read the raw one)
        if finished:
            if rank == 0:
                print(f"steptitan: {finished}", file=sys.stderr)
            return EXIT_OK
        dp_replicate = parallel_degrees(recipe.parallel, env_world_size())[0]  # a bad layout: one clear message
        check_memory_fits(recipe, plans)
        run_lock = rundir.prepare_run_dir(recipe, plans) if rank == 0 else None  # noqa: F841 -- the lock is held while this reference lives (to the end of main)
        data = prepare_data(recipe.data, recipe.model.vocab_size)
        check_data_fits(recipe, len(data.tokens("train")), len(data.tokens("val")))
    except (RecipeError, DataError, FileExistsError) as exc:
        print(f"steptitan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("steptitan: interrupted (Ctrl-C) before training started; nothing was written", file=sys.stderr)
        return stopping.EXIT_INTERRUPTED

    # Heavy imports and the process group only after everything is validated.
    from steptitan.checkpoint import DiskSpaceError
    from steptitan.distributed import init_distributed, shutdown_distributed
    from steptitan.metrics import setup_logging
    from steptitan.trackers import TrackerError
    from steptitan.trainer import Trainer, TrainingError

    setup_logging(rank)
    from steptitan.device import set_deterministic

    set_deterministic(recipe.training.deterministic)  # before any CUDA work: CUBLAS_WORKSPACE_CONFIG
    stopping.sigterm_kills()  # waiting for peers in C++ now: a SIGTERM (torchrun stopping us) must end it
    env = init_distributed(recipe.training.backend, timeout_s=recipe.training.collective_timeout_s,
                           dp_replicate=dp_replicate)
    from steptitan.device import configure_numerics

    configure_numerics(env.device, recipe.training.deterministic)  # TF32 on CUDA unless deterministic
    from steptitan.watchdog import start_watchdog

    watchdog = start_watchdog(env.rank, env.world_size, recipe.training.heartbeat_timeout_s)
    stopping.defer_sigterm()  # from now on SIGTERM = save at the next step boundary, then exit 5
    status = "done"  # "done" = every rank leaves together (shutdown barrier); "failed:..." = alone, peers told
    trainer = None
    try:
        trainer = Trainer(recipe, plans, data, env)
        trainer.run()
        if env.is_main:
            rundir.mark_finished(recipe.run_dir)  # after summary.json: a re-run now says "already finished"
    except TrainingError as exc:  # every rank sees the same all-reduced loss and stops together
        print(f"steptitan: error on rank {env.rank}: {exc}", file=sys.stderr)
        return EXIT_TRAINING
    except stopping.Preempted as exc:  # every rank saw the all-reduced SIGTERM flag and saved together
        if env.is_main:
            print(f"steptitan: preempted (SIGTERM): {exc}; exit code {stopping.EXIT_PREEMPTED}", file=sys.stderr)
        return stopping.EXIT_PREEMPTED
    except (KeyboardInterrupt, SystemExit) as exc:  # not a clean finish: leave alone, peers learn it by heartbeat
        status = f"failed:interrupted ({type(exc).__name__})"
        if watchdog is not None:
            watchdog.stop(status)  # tell the peers first: rank 0 speaks for a Ctrl-C that reached every rank
        if stopping.reports_interrupt(env.rank, watchdog):
            print(stopping.interrupted_message(env.rank, exc, getattr(trainer, "position", None), recipe.run_dir),
                  file=sys.stderr)
        return stopping.EXIT_INTERRUPTED
    except TrackerError as exc:  # raised on every rank together (trackers.start_trackers), before training
        if env.is_main:
            print(f"steptitan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DiskSpaceError as exc:  # maybe on this rank only: peers learn it through the heartbeat store
        status = f"failed:{type(exc).__name__}: disk full"
        print(f"steptitan: error on rank {env.rank}: {exc.strerror}", file=sys.stderr)
        return EXIT_TRAINING
    except Exception as exc:
        from steptitan.checkpoint import is_enospc
        from steptitan.device import is_peer_failure

        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        status = f"failed:{type(exc).__name__}: {first_line}"
        if is_enospc(exc):  # outside a checkpoint's shards: summary.json, meta.json, TensorBoard, ...
            status = "failed:DiskSpaceError: disk full"
            print(f"steptitan: error on rank {env.rank}: not enough disk space for the run folder {recipe.run_dir} "
                  f"({first_line}); free space there, then run the same command to resume from the newest checkpoint",
                  file=sys.stderr)
            return EXIT_TRAINING
        if is_peer_failure(exc):  # gloo or NCCL (docs/gpu.md)
            # A collective timed out or a peer's connection dropped: a peer died or hung.
            print(f"steptitan: error on rank {env.rank}: a collective failed, another rank died or hung "
                  f"(training.collective_timeout_s={recipe.training.collective_timeout_s:g}): {first_line}",
                  file=sys.stderr)
            return EXIT_PEER_FAILED
        raise  # a bug: keep the traceback; the watchdog status tells the peers which rank failed
    finally:
        if watchdog is not None:
            watchdog.stop(status)
        if trainer is not None:  # a run that stopped early: flush TensorBoard, finish W&B (no-op after a clean run)
            try:
                trainer.metrics.close()
            except Exception:  # noqa: BLE001 - e.g. no disk space left for the last events; the exit code says why
                pass
        shutdown_distributed(synchronize=status == "done")
    return EXIT_OK


def exit_process(code: int) -> None:
    """``sys.exit(code)``, except that a worker that stopped early leaves at once with ``os._exit``.

    The interpreter's teardown of a training process (its model, optimizer and
    library objects) is seconds of CPU without a system call -- measured 5.6 s
    on a loaded 2-core machine after a Ctrl-C -- and torchrun waits for it
    before reporting the job, with its SIGKILL 30 s after a SIGTERM. Everything
    that matters was done by then: checkpoints fsynced, trackers closed, the
    process group destroyed, the peers told through the heartbeat store.
    """
    from steptitan.stopping import EXIT_INTERRUPTED, EXIT_PREEMPTED

    if code in (EXIT_TRAINING, EXIT_PEER_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
