"""PEFT plugins in one process: function-preserving transforms (hypothesis, float32) and state handling.

The same transforms under 2-rank FSDP2 are in tests/test_peft_dist.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from steptitan.distributed import reshard
from steptitan.model import ModelShape
from steptitan.optim import AdamWSliceSteps
from steptitan.peft import StepContext, optimizer_state
from steptitan.recipe import RecipeError, load_recipe
from steptitan.plan import build_plan
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import ALL_LINEARS, lora_modules
from steptitan.registry.peft.refactor import refactor_lora_linear

from conftest import REPO, dense, model_shapes

ATOL, RTOL = 5e-5, 1e-5  # float32 tolerances on logits of order 1 for transforms that round (compensation, SVD)


shapes = model_shapes  # its defaults: heads 1..4 in groups of KV heads 1..2, 1..2 layers, FFN 3..24


TARGETS = st.sampled_from([list(ALL_LINEARS), ["wq", "wv"], ["feed_forward.*"]])


def method(name: str, layers: list[int], seed: int = 0, **options):
    cls = PEFT.get(name)
    return cls(cls.Options(**options), layers, seed=seed)


def adapted(shape: ModelShape, seed: int, name: str = "lora", **options):
    model = dense(shape, seed)
    m = method(name, list(range(shape.n_layers)), seed=seed, **options)
    m.apply(model)
    m.init_weights(model)
    return model, m


def tokens(shape: ModelShape, seed: int) -> torch.Tensor:
    return torch.randint(0, shape.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def out(model, x) -> torch.Tensor:
    return model(x)


@torch.no_grad()
def randomize_adapters(model, seed: int) -> None:
    """Non-zero A and B, as after some training."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / math.sqrt(m.in_features))
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) / (m.scale * math.sqrt(m.lora_A.shape[0])))  # s B A ~ W


def train_steps(model, opt, x, n: int, m=None, first_step: int = 1, total: int = 100) -> None:
    """n optimizer steps on a fixed batch, calling the method's hooks like the trainer does."""
    for step in range(first_step, first_step + n):
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        reshard(model)  # the trainer reshards before the hooks (a no-op without FSDP2)
        if m is not None:
            m.before_optimizer_step(StepContext(step, model, opt, 0, total))
        opt.step()
        if m is not None:
            m.after_optimizer_step(StepContext(step, model, opt, 0, total))


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- LoRA


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), rank=st.integers(1, 6), targets=TARGETS,
       init=st.sampled_from(["kaiming", "gaussian", "uniform", "pissa"]), alpha=st.floats(0.5, 32))
def test_lora_init_keeps_function(shape, seed, rank, targets, init, alpha):
    model = dense(shape, seed)
    x = tokens(shape, seed)
    before = out(model, x)
    m = method("lora", list(range(shape.n_layers)), seed=seed, rank=rank, alpha=alpha, targets=targets, init=init)
    m.apply(model)
    m.init_weights(model)
    after = out(model, x)
    for _, mod in lora_modules(model):
        assert mod.lora_A.abs().sum() > 0  # never the A = B = 0 dead start
        assert (mod.lora_B.abs().sum() == 0) == (init in ("kaiming", "gaussian"))
    if init in ("kaiming", "gaussian"):
        assert torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before, atol=ATOL, rtol=RTOL)


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), rank=st.integers(1, 6), targets=TARGETS)
def test_lora_merge_is_exact(shape, seed, rank, targets):
    model, m = adapted(shape, seed, rank=rank, targets=targets)
    randomize_adapters(model, seed)
    x = tokens(shape, seed)
    before = out(model, x)
    expected = {n: mod.weight + mod.scale * mod.lora_B @ mod.lora_A for n, mod in lora_modules(model)}
    m.merge(model)
    torch.testing.assert_close(out(model, x), before, atol=ATOL, rtol=RTOL)
    for n, mod in lora_modules(model):
        assert torch.equal(mod.lora_B, torch.zeros_like(mod.lora_B))
        torch.testing.assert_close(mod.weight, expected[n], atol=1e-6, rtol=1e-6)


def test_lora_freezes_only_adapted_base_weights():
    shape = ModelShape(dim=8, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    model, _ = adapted(shape, 0, targets=["wq", "w2"])
    for name, p in model.named_parameters():
        adapted_base = name.endswith(("wq.weight", "w2.weight"))
        assert p.requires_grad != adapted_base, name


# --------------------------------------------------------------------------- ReLoRA


@settings(max_examples=25)
@given(shape=shapes(), seed=st.integers(0, 2**16), rank=st.integers(1, 5),
       mode=st.sampled_from(["magnitude", "random", "full"]), ratio=st.floats(0.0, 1.0),
       init=st.sampled_from(["kaiming", "gaussian", "uniform"]))
def test_relora_reset_keeps_function_and_prunes_state(shape, seed, rank, mode, ratio, init):
    model, m = adapted(shape, seed, "relora", rank=rank, reset_interval=3, optimizer_reset=mode, prune_ratio=ratio, init=init)
    # float64: the merge + re-init is exact in real arithmetic, and the "uniform" init compensates W by
    # -s B'A' (|s B'A'| up to ~100x |W|), whose float32 cancellation alone costs ~1e-4 on the logits.
    model.double()
    x = tokens(shape, seed)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    train_steps(model, opt, x, 2, m)  # steps 1, 2: no reset yet
    randomize_adapters(model, seed)
    old_a = {n: mod.lora_A.clone() for n, mod in lora_modules(model)}
    zeros_before = {(n, p, k): int((optimizer_state(opt, getattr(mod, p))[k] == 0).sum())
                    for n, mod in lora_modules(model) for p in ("lora_A", "lora_B") for k in ("exp_avg", "exp_avg_sq")}
    before = out(model, x)
    m.after_optimizer_step(StepContext(3, model, opt, 0))  # step 3: merge + re-init + prune
    assert all(p.dtype == torch.float64 for p in model.parameters())  # the re-init kept the dtype
    torch.testing.assert_close(out(model, x), before, atol=1e-10, rtol=1e-10)
    for n, mod in lora_modules(model):
        assert mod.lora_A.abs().sum() > 0 and not torch.equal(mod.lora_A, old_a[n])  # a fresh, non-zero A
        if init != "uniform":
            assert torch.equal(mod.lora_B, torch.zeros_like(mod.lora_B))
        for pname in ("lora_A", "lora_B"):
            state = optimizer_state(opt, getattr(mod, pname))
            for key in ("exp_avg", "exp_avg_sq"):
                n_zero, n_all = int((state[key] == 0).sum()), state[key].numel()
                if mode == "full":
                    assert n_zero == n_all
                else:  # floor(ratio n) entries pruned, plus any that were zero already
                    assert int(ratio * n_all) <= n_zero <= int(ratio * n_all) + zeros_before[(n, pname, key)]
            if mode == "full":
                assert state["step"].item() == 0
            else:
                assert state["step"].item() == 2
    # The A = B = 0 bug is avoided: B gets a gradient right after the reset.
    opt.zero_grad()
    model(x).logsumexp(-1).mean().backward()
    assert any(mod.lora_B.grad.abs().sum() > 0 for _, mod in lora_modules(model))


@pytest.mark.parametrize("mode", ["magnitude", "random"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.99])
def test_relora_pruned_fraction_matches_setting(mode, ratio):
    """With distinct non-zero state values the pruned count is exactly floor(ratio * n), both moments are pruned at the
    same entries (never m != 0 with v = 0: issue 11), and magnitude pruning keeps the largest |exp_avg|."""
    from steptitan.registry.peft.relora import reset_adapter_state

    g = torch.Generator().manual_seed(1)
    state = {"exp_avg": torch.randn(37, 11, generator=g), "exp_avg_sq": torch.rand(37, 11, generator=g) + 0.1,
             "step": torch.tensor(5.0)}
    orig = {k: v.clone() for k, v in state.items()}
    reset_adapter_state(state, mode, ratio, torch.Generator().manual_seed(2))
    pruned = state["exp_avg"] == 0
    assert int(pruned.sum()) == int(ratio * pruned.numel())
    assert torch.equal(state["exp_avg_sq"] == 0, pruned)  # one mask for both moments
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][~pruned], orig[key][~pruned])  # survivors untouched
    if mode == "magnitude" and pruned.any() and (~pruned).any():
        assert orig["exp_avg"][pruned].abs().max() < orig["exp_avg"][~pruned].abs().min()
    assert state["step"].item() == 5


def relora_run(mode: str, reset_interval: int = 8, steps: int = 19, rank: int = 8):
    """relora.toml's stage-1 settings scaled down (alpha = 2 rank, lr 4e-3, prune 0.9, AdamW betas 0.9/0.95,
    eps 1e-8) on a fixed next-token batch: per step (loss before the update, |A|_F after the step and reset)."""
    shape = ModelShape(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=32, ffn_hidden=24, max_seq_len=16)
    model, m = adapted(shape, 0, "relora", rank=rank, alpha=2 * rank, reset_interval=reset_interval,
                       optimizer_reset=mode, prune_ratio=0.9)
    opt = torch.optim.AdamW(trainable(model), lr=4e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    seq = torch.randint(0, shape.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    a_norm = lambda: sum(mod.lora_A.pow(2).sum() for _, mod in lora_modules(model)).sqrt().item()  # noqa: E731
    losses, norms = {}, {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        loss.backward()
        opt.step()
        m.after_optimizer_step(StepContext(step, model, opt, 0, steps))
        losses[step], norms[step] = loss.item(), a_norm()
    return losses, norms


@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_relora_training_through_resets_stays_bounded(mode):
    """Issue 11: pruning the moments with independent masks left entries with m != 0, v = 0; right after a
    reset A's gradient is 0 (B = 0), so they stepped by lr m / eps and |A| exploded. Through two resets
    |A|_F must stay within a small multiple of its fresh draw and the loss must not jump."""
    n = 8
    losses, norms = relora_run(mode, reset_interval=n)
    for reset in (n, 2 * n):
        for step in (reset + 1, reset + 2):  # the updates right after the reset
            assert norms[step] <= 1.5 * norms[reset], (mode, reset, step, norms)
        for step in (reset + 1, reset + 2, reset + 3):  # losses measured after those updates
            assert losses[step] <= losses[reset] + 0.1, (mode, reset, step, losses)


def test_relora_redraws_a_at_every_reset_and_the_total_update_exceeds_rank_r():
    """A is a new draw at each of K resets (not a repeat of any earlier A), and the summed update
    W_K - W_0 = s sum_k B_k A_k reaches rank > r: the point of restarting (Lialin et al., Sec. 3)."""
    shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    r, n, k = 1, 3, 4
    model, m = adapted(shape, 0, "relora", rank=r, reset_interval=n, targets=["wq"], optimizer_reset="full")
    _, mod = lora_modules(model)[0]
    w0 = mod.weight.detach().clone()
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    x = tokens(shape, 0)
    draws = [mod.lora_A.detach().clone()]
    for reset in range(1, k + 1):
        train_steps(model, opt, x, n, m, first_step=(reset - 1) * n + 1)
        draws.append(mod.lora_A.detach().clone())
    for i in range(1, len(draws)):
        assert all(not torch.allclose(draws[i], draws[j]) for j in range(i)), i
    update = mod.weight.detach() - w0
    assert torch.linalg.matrix_rank(update).item() > r


def test_relora_jagged_schedule():
    m = method("relora", [0], reset_interval=10, restart_warmup_steps=4)
    factors = [m.lr_factor(t + 1) for t in range(25)]  # factors[k]: optimizer step k + 1 (lr_factor is 1-based)
    assert factors[:10] == [1.0] * 10  # before the first reset: the plain (warmup + cosine) schedule
    assert factors[10:15] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # optimizer steps 11..15 after the reset at 10
    assert factors[15:20] == [1.0] * 5 and factors[20] == pytest.approx(0.2)


# --------------------------------------------------------------------------- SwitchLoRA


def switch_setup(shape, seed, rank, **options):
    model, m = adapted(shape, seed, "switchlora", rank=rank, interval0=1e12, **options)  # no scheduled switches
    cls, kwargs = m.optimizer_class(model)
    opt = cls(trainable(model), lr=1e-2, **kwargs)
    x = tokens(shape, seed)
    train_steps(model, opt, x, 2, m)
    return model, m, opt, x


@settings(max_examples=30)
@given(shape=shapes(), seed=st.integers(0, 2**16), rank=st.integers(1, 5), data=st.data())
def test_switchlora_switch_rows_and_columns_keep_function(shape, seed, rank, data):
    model, m, opt, x = switch_setup(shape, seed, rank)
    name, mod = data.draw(st.sampled_from(lora_modules(model)))
    pool = m.pool_size(mod)
    k = data.draw(st.integers(1, min(rank, pool)))
    rows = torch.tensor(data.draw(st.permutations(range(rank)))[:k])
    slots = torch.tensor(data.draw(st.permutations(range(pool)))[:k])
    before = out(model, x)
    cand = m.pools[name]["A"][:, slots].t().clone()
    old_a = mod.lora_A[rows].clone()
    m.switch_rows(name, mod, rows, slots, opt, step=2)
    torch.testing.assert_close(out(model, x), before, atol=ATOL, rtol=RTOL)
    assert torch.equal(mod.lora_A[rows], cand) and torch.equal(m.pools[name]["A"][:, slots].t(), old_a)
    state = optimizer_state(opt, mod.lora_A)
    for key in ("exp_avg", "exp_avg_sq", "step"):  # moments and per-row step counts reset
        assert torch.equal(state[key][rows], torch.zeros_like(state[key][rows]))
    others = torch.tensor([i for i in range(rank) if i not in rows.tolist()], dtype=torch.long)
    assert torch.all(state["step"][others] == 2)
    assert torch.all(m.frozen_B[name][rows] == 2 + m.options.freeze_steps)

    cols = torch.tensor(data.draw(st.permutations(range(rank)))[:k])
    before = out(model, x)
    cand = m.pools[name]["B"][:, slots].clone()
    m.switch_cols(name, mod, cols, slots, opt, step=2)
    torch.testing.assert_close(out(model, x), before, atol=ATOL, rtol=RTOL)
    assert torch.equal(mod.lora_B[:, cols], cand)
    state = optimizer_state(opt, mod.lora_B)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(state[key][:, cols], torch.zeros_like(state[key][:, cols]))


def test_switchlora_counterpart_frozen_then_released():
    shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    model, m, opt, x = switch_setup(shape, 3, 4, freeze_steps=3)
    name, mod = lora_modules(model)[0]
    m.switch_rows(name, mod, torch.tensor([1]), torch.tensor([0]), opt, step=2)  # freezes B[:, 1] for steps 3..5
    m.switch_cols(name, mod, torch.tensor([2]), torch.tensor([0]), opt, step=2)  # freezes A[2] for steps 3..5
    frozen = lambda: (mod.lora_B[:, 1].clone(), mod.lora_A[2].clone(),
                      optimizer_state(opt, mod.lora_B)["exp_avg"][:, 1].clone(), optimizer_state(opt, mod.lora_B)["step"][0, 1].clone())
    start = frozen()
    free_b = mod.lora_B[:, 0].clone()
    train_steps(model, opt, x, 3, m, first_step=3)
    for a, b in zip(start, frozen()):
        assert torch.equal(a, b)  # no update at all during the freeze
    assert not torch.equal(free_b, mod.lora_B[:, 0])  # the others trained
    # The switched vector itself trained from a fresh state: its step count is 3, the others' 5.
    assert optimizer_state(opt, mod.lora_A)["step"][1].item() == 3 and optimizer_state(opt, mod.lora_A)["step"][0].item() == 5
    train_steps(model, opt, x, 1, m, first_step=6)  # freeze over
    assert not torch.equal(start[0], mod.lora_B[:, 1]) and not torch.equal(start[1], mod.lora_A[2])
    steps_a, steps_b = optimizer_state(opt, mod.lora_A)["step"], optimizer_state(opt, mod.lora_B)["step"]
    assert steps_b[0, 1].item() == 3 and steps_a[2].item() == 3  # 2 before the freeze, +1 now
    assert steps_b[0, 2].item() == 4 and steps_a[1].item() == 4  # reset at step 2, trained in steps 3..6


def test_switchlora_scheduled_switches_never_pair_and_frozen_counterparts_hold():
    """Through the trainer's hooks with several switches per step: row i of A and column i of B never switch in
    the same step, and after A[i] (B[:, i]) switches at step s its counterpart B[:, i] (A[i]) is unchanged by
    optimizer steps s+1 .. s+freeze_steps (SwitchLoRA, arXiv 2406.06564, method section)."""
    shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    freeze, steps = 3, 12
    model, m = adapted(shape, 2, "switchlora", rank=6, interval0=3.0, descent_ratio=1e6, freeze_steps=freeze)
    cls, kwargs = m.optimizer_class(model)
    opt = cls(trainable(model), lr=1e-2, **kwargs)
    switched = {}  # (step, name) -> {"A": rows, "B": cols}
    before, after = {}, {}  # (step, name) -> (A, B) after step's update, before / after its switches
    orig_rows, orig_cols = m.switch_rows, m.switch_cols

    def switch_rows(name, module, rows, slots, optimizer, step):
        before[(step, name)] = (module.lora_A.detach().clone(), module.lora_B.detach().clone())
        switched[(step, name)] = {"A": rows.tolist()}
        orig_rows(name, module, rows, slots, optimizer, step)

    def switch_cols(name, module, cols, slots, optimizer, step):
        switched[(step, name)]["B"] = cols.tolist()
        orig_cols(name, module, cols, slots, optimizer, step)
        after[(step, name)] = (module.lora_A.detach().clone(), module.lora_B.detach().clone())

    m.switch_rows, m.switch_cols = switch_rows, switch_cols
    train_steps(model, opt, tokens(shape, 2), steps, m, total=steps)
    held = {"A": 0, "B": 0}
    for (s, name), sw in switched.items():
        assert not set(sw["A"]) & set(sw["B"]), (s, name, sw)
        for kind, other in (("A", 1), ("B", 0)):  # A[i] switched -> B[:, i] frozen, and vice versa
            for i in sw[kind]:
                frozen = (lambda t: t[other][:, i]) if kind == "A" else (lambda t: t[other][i])  # noqa: E731
                for t in range(s + 1, min(s + freeze, steps) + 1):
                    assert torch.equal(frozen(before[(t, name)]), frozen(after[(s, name)])), (kind, i, s, t)
                held[kind] += s + freeze <= steps
    assert held["A"] > 0 and held["B"] > 0  # full freeze windows of both kinds were observed


def test_switchlora_schedule_and_scheduled_switches_keep_function():
    m = method("switchlora", [0], interval0=40, descent_ratio=0.1)
    assert m.interval(0, 1000) == 40 and m.interval(100, 1000) == pytest.approx(40 / 0.3)
    g = torch.Generator().manual_seed(0)
    mean = sum(m.switch_count(16, 0, 1000, g) for _ in range(4000)) / 4000
    assert mean == pytest.approx(16 / 40, abs=0.03)  # stochastic rounding keeps the expectation r / interval
    shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    model, m = adapted(shape, 1, "switchlora", rank=4, interval0=0.5)  # 8 switches asked per step: all free vectors
    cls, kwargs = m.optimizer_class(model)
    opt = cls(trainable(model), lr=1e-2, **kwargs)
    x = tokens(shape, 1)
    train_steps(model, opt, x, 1, m)
    for step in (2, 3):
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        m.before_optimizer_step(StepContext(step, model, opt, 0, 10))
        opt.step()
        m.restore_frozen()
        before = out(model, x)
        m.after_optimizer_step(StepContext(step, model, opt, 0, 10))
        torch.testing.assert_close(out(model, x), before, atol=ATOL, rtol=RTOL)
    assert m.switches > 0


def test_switchlora_state_dict_roundtrip_and_pool_bytes():
    shape = ModelShape(dim=8, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    model, m, opt, x = switch_setup(shape, 5, 3, pool_size=5)
    name, mod = lora_modules(model)[0]
    m.switch_rows(name, mod, torch.tensor([0]), torch.tensor([4]), opt, step=2)
    fresh = adapted(shape, 5, "switchlora", rank=3, pool_size=5)[1]
    fresh.load_state_dict(m.state_dict())
    for n in m.pools:
        assert all(torch.equal(m.pools[n][k], fresh.pools[n][k]) for k in ("A", "B"))
        assert torch.equal(m.frozen_B[n], fresh.frozen_B[n])
    expected = sum(5 * (mod.in_features + mod.out_features) * 4 for _, mod in lora_modules(model))
    assert m.extra_state_bytes() == expected == m.predicted_extra_state_bytes(model, 1, 0)


# --------------------------------------------------------------------------- optimizer


def test_slice_step_adamw_matches_torch_adamw_then_resets_rows():
    g = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kwargs = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, **kwargs)
    opt = AdamWSliceSteps(mine, step_dims={mine[0]: 0}, **kwargs)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, q, gr in zip(ref, mine, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref, mine):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)
    assert opt.state[mine[0]]["step"].shape == (5, 1) and opt.state[mine[1]]["step"].dim() == 0
    # Reset row 2; the next update of row 2 equals a fresh AdamW's first step on that row.
    state = opt.state[mine[0]]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        state[key][2] = 0
    row = torch.nn.Parameter(mine[0][2].detach().clone())
    fresh = torch.optim.AdamW([row], **kwargs)
    grad = torch.randn(5, 3, generator=g)
    mine[0].grad, row.grad = grad, grad[2].clone()
    opt.step()
    fresh.step()
    torch.testing.assert_close(mine[0][2], row, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- refactorization, momentum reset


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), rank=st.integers(1, 6))
def test_refactor_keeps_product_and_function(shape, seed, rank):
    model, _ = adapted(shape, seed, rank=rank)
    randomize_adapters(model, seed)
    x = tokens(shape, seed)
    before = out(model, x)
    products = {n: mod.lora_B @ mod.lora_A for n, mod in lora_modules(model)}
    r = method("refactor", list(range(shape.n_layers)), interval=1)
    r.after_optimizer_step(StepContext(1, model, None, 0))
    torch.testing.assert_close(out(model, x), before, atol=ATOL, rtol=RTOL)
    for n, mod in lora_modules(model):
        torch.testing.assert_close(mod.lora_B @ mod.lora_A, products[n], atol=1e-5, rtol=1e-5)
        k = min(rank, mod.in_features, mod.out_features)
        if r.skipped == 0 and k == rank:  # balanced: B^T B = A A^T = diag(S)
            torch.testing.assert_close(mod.lora_B.t() @ mod.lora_B, mod.lora_A @ mod.lora_A.t(), atol=1e-4, rtol=1e-4)


def test_refactor_skips_a_zero_product():
    shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    model, _ = adapted(shape, 0, rank=2)  # B = 0 right after a kaiming init
    _, mod = lora_modules(model)[0]
    a = mod.lora_A.clone()
    assert not refactor_lora_linear(mod) and torch.equal(mod.lora_A, a)  # A kept: no A = B = 0


@pytest.mark.parametrize("scope", ["adapters", "optimizer"])
def test_momentum_reset_zeroes_moments_and_lr_recovers_on_its_ramp(scope):
    shape = ModelShape(dim=8, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=12, max_seq_len=16)
    model, _ = adapted(shape, 0, rank=2, targets=["wq"])
    mr = method("momentum_reset", [0, 1], interval=6, recovery_steps=5, start_factor=0.001, scope=scope)
    opt = torch.optim.AdamW(trainable(model), lr=1.0)
    # the trainer multiplies this into its schedule; scheduler step s serves optimizer step s + 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: mr.lr_factor(s + 1))
    x = tokens(shape, 0)
    lrs = []
    for step in range(1, 13):
        lrs.append(opt.param_groups[0]["lr"])  # the LR optimizer step `step` uses
        train_steps(model, opt, x, 1, mr, first_step=step)
        sched.step()
        if step == 6:
            adapters = {id(p) for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)}
            for p in trainable(model):
                state = optimizer_state(opt, p)
                zero = all(torch.count_nonzero(state[k]) == 0 for k in ("exp_avg", "exp_avg_sq"))
                assert zero == (scope == "optimizer" or id(p) in adapters)
                assert state["step"].item() == 6  # step counts kept
    ramp = [0.001 + 0.999 * j / 5 for j in range(5)]
    assert lrs == pytest.approx([1.0] * 6 + ramp + [1.0])


# --------------------------------------------------------------------------- recipes and options


@pytest.mark.parametrize("recipe", ["relora", "switchlora", "step_relora", "step_switchlora"])
def test_recipes_plan(recipe):
    plans = build_plan(load_recipe(REPO / "recipes" / f"{recipe}.toml"))
    names = {m.registry_name for p in plans for m in p.peft}
    assert names & {"relora", "switchlora"}
    if recipe.startswith("step_"):
        grown = plans[-1]
        assert grown.peft[0].layers == sorted(grown.old_layers) and "old" in grown.freeze


def test_tricks_compose_through_extra_peft():
    override = ("stages.1.extra_peft=[{method: refactor, layers: old, interval: 5}, "
                "{method: momentum_reset, layers: old, interval: 5}]")
    plans = build_plan(load_recipe(REPO / "recipes" / "step_relora.toml", [override]))
    assert [m.registry_name for m in plans[1].peft] == ["relora", "refactor", "momentum_reset"]


@pytest.mark.parametrize("override, message", [
    ("stages.1.peft.optimizer_reset=prune", "optimizer_reset must be one of"),
    ("stages.1.peft.reset_interval=0", "reset_interval must be > 0"),
    ("stages.1.peft.init=zeros", "init must be one of"),
    ("stages.1.peft.prune_ratio=1.5", "prune_ratio must be in [0, 1]"),
    ("stages.1.extra_peft=[{method: refactor, layers: new}]", "refactor needs LoRA adapters"),
])
def test_bad_options_are_recipe_errors(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_plan(load_recipe(REPO / "recipes" / "step_relora.toml", [override]))
