"""Sample text from a checkpoint: ``steptitan generate RUN_OR_CHECKPOINT --prompt "..."``.

    steptitan generate runs/step --prompt "The history of" --max-new-tokens 40
    steptitan generate runs/step/checkpoints/stage00-step000060 --prompt a --prompt b --temperature 0 (greedy)

No export first: the DCP checkpoint is read into one unsharded model on the CPU, in one process
(the loader ``steptitan export`` uses; any stage, any rank count), each PEFT method merged into the
dense weights by its own ``merge``, as ``export`` does: what is sampled is the exported model. The tokenizer is the one the run trained with. A prompt is
conditioned as the start of a document: it follows an end-of-text token, as every document but
the first does in training (data.py packs documents separated by it). Without a KV cache each
new token re-runs the whole context, cut to the model's last ``seq_len`` tokens.

The same ``sample`` serves ``metrics.sample_prompts`` at stage ends, on the sharded model on every
rank: a fixed number of forwards (no early stop) and a private ``torch.Generator`` keep the ranks'
FSDP2 collectives in step and the global RNG (saved in checkpoints) untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from steptitan.recipe import MetricsConfig

if TYPE_CHECKING:  # torch is imported where a model runs: `steptitan generate --help` needs none of it
    import torch
    from torch import nn


def sample(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           seed: int = 0, context: int = 2048, device: torch.device | str = "cpu") -> list[int]:
    """``max_new_tokens`` token ids continuing ``ids``: temperature 0 = greedy, top_k 0 = no cut."""
    import torch

    with torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out = list(ids)
        was_training = model.training
        model.eval()
        for _ in range(max_new_tokens):
            x = torch.tensor([out[-context:]], dtype=torch.long, device=device)
            logits = model(x)[0, -1].float().cpu()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if 0 < top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
            out.append(nxt)
        model.train(was_training)
        return out[len(ids):]


def complete(model: nn.Module, tokenizer, eos_id: int | None, prompt: str, max_new_tokens: int,
             temperature: float, top_k: int, seed: int, context: int, device: torch.device | str = "cpu") -> str:
    """The text continuing ``prompt`` (``tokenizer``: a ``tokenizers.Tokenizer``), cut at end-of-text."""
    ids = ([eos_id] if eos_id is not None else []) + tokenizer.encode(prompt).ids
    new = sample(model, ids, max_new_tokens, temperature, top_k, seed, context, device)
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id)]
    return tokenizer.decode(new)


def stage_samples(model: nn.Module, tokenizer_dir: Path, eos_id: int, cfg: MetricsConfig, seed: int, context: int,
                  device: torch.device) -> list[tuple[str, str]]:
    """(prompt, completion) for each of ``metrics.sample_prompts``, on the sharded model; every rank
    calls it (FSDP2's forwards are collectives) with the same seeds, a fixed number of tokens each."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [(prompt, complete(model, tokenizer, eos_id, prompt, cfg.sample_tokens, cfg.sample_temperature,
                              cfg.sample_top_k, seed + i, context, device)) for i, prompt in enumerate(cfg.sample_prompts)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="steptitan generate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint folder (stageNN-stepNNNNNN)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (with --recipe)")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = the whole vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", help="the recipe TOML, when the run folder has no recipe.json / summary.json")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        p.error("--max-new-tokens, --temperature and --top-k must be >= 0")
    if args.overrides and not args.recipe:
        p.error("key=value overrides need --recipe")

    from steptitan.data import EOS_TOKEN, DataError, load_tokenizer
    from steptitan.export import ExportError, find_checkpoint, find_tokenizer, load_merged_model, recipe_for
    from steptitan.recipe import RecipeError

    try:
        info = find_checkpoint(args.checkpoint)
        recipe = recipe_for(info, args.recipe, args.overrides)
        tok_path = find_tokenizer(recipe)
        if tok_path is None:
            raise ExportError("the run's tokenizer.json is gone (data.tokenizer, or the trained BPE in data.cache_dir)")
        tokenizer = load_tokenizer(tok_path)
        plan, model = load_merged_model(recipe, info)
    except (ExportError, RecipeError, DataError, FileNotFoundError) as exc:
        print(f"steptitan generate: error: {exc}", file=sys.stderr)
        return 2
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.tokenizer.token_to_id(EOS_TOKEN)
    print(f"# {info.path} (stage {info.stage} {plan.name!r}, step {info.step}; {plan.shape.n_layers} layers, "
          f"dim {plan.shape.dim}); temperature {args.temperature:g}, top-k {args.top_k}, seed {args.seed}",
          file=sys.stderr)
    for i, prompt in enumerate(args.prompt):
        text = complete(model, tokenizer.tokenizer, eos, prompt, args.max_new_tokens, args.temperature, args.top_k,
                        args.seed + i, plan.shape.max_seq_len)
        print(("\n" if i else "") + prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
