"""AltLoRA / AltLoRA+ under FSDP2 (``fully_shard``, DTensor parameters): 2 CPU processes (gloo)
equal one process on the global batch, for both placements of ``lora_A`` (FSDP's default
``Shard(0)`` on its r rows, and ``Shard(1)`` from ``lora_shard_placement_fn``), both variants and
the schedules; a checkpoint through ``torch.distributed.checkpoint`` resumes exactly; bad
placements and a NaN in one rank's shard are handled the same way on every rank.

The model has odd, uneven shapes: a layer with r = 1 < world size (one rank holds no row of A),
one with k = 1 (one rank holds no row of B), two layers of one shape (a group of two), a frozen
base weight and a trained bias (the AdamW group). All runs share one spawn (starting processes
is the slow part); each test reads its results.
"""

import math
import os

import pytest
import torch
from torch import nn

import altlora

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:
    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError as exc:  # pragma: no cover - old torch
    pytest.skip(f"FSDP2 / DTensor / DCP not available in this torch: {exc}", allow_module_level=True)

from altlora.distributed import lora_shard_placement_fn

WORLD, LOCAL_BATCH, STEPS, SAVE_AT = 2, 3, 6, 3
IN = 26
HPARAMS = {"AltLoRA": dict(lr=0.05, momentum=0.9, damping=1e-3), "AltLoRAPlus": dict(lr=0.01, betas=(0.9, 0.99), damping=1e-3)}
# (placement, variant, schedule, extra options); placement "default" = FSDP's Shard(0) everywhere.
CONFIGS = [
    (placement, variant, schedule, {})
    for placement in ("default", "columns")
    for variant in ("AltLoRA", "AltLoRAPlus")
    for schedule in ("alternate", "joint")
] + [
    ("columns", "AltLoRA", "sequential", {}),
    ("default", "AltLoRAPlus", "alternate", {"switch_every": 2}),
    ("columns", "AltLoRAPlus", "alternate", {"nonfinite": "skip", "nan_at": 2}),
    ("columns", "AltLoRA", "alternate", {"peft": True}),
    # lora_A of "left" (columns or rows) and "mid" (rows) rescaled outside the optimizer.
    ("columns", "AltLoRA", "alternate", {"rescale_at": 2}),
    ("default", "AltLoRAPlus", "joint", {"rescale_at": 2}),
]
try:
    import peft
except ImportError:  # the PEFT case is skipped
    peft = None
CONFIG_IDS = [f"{p}-{v}-{s}" + "".join(f"-{k}={val}" for k, val in x.items()) for p, v, s, x in CONFIGS]
# Checkpoint at step SAVE_AT, resume in a fresh model + optimizer; the last one is in the middle
# of a run of A phases (switch_every=2: a live snapshot in the state).
RESUME = [CONFIGS.index(c) for c in (("default", "AltLoRA", "joint", {}), ("columns", "AltLoRAPlus", "alternate", {}),
                                      ("default", "AltLoRAPlus", "alternate", {"switch_every": 2}))]


class LoRALayer(nn.Module):
    """y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ (+ bias); W0 frozen, B non-zero so that A phases count at once."""

    def __init__(self, d, k, r, alpha, gen, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d, generator=gen) / math.sqrt(d), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d, generator=gen) / math.sqrt(d))
        self.lora_B = nn.Parameter(0.5 * torch.randn(k, r, generator=gen))
        self.scaling = alpha / r
        self.bias = nn.Parameter(torch.zeros(k)) if bias else None

    def forward(self, x):
        y = x @ self.weight.T + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T
        return y if self.bias is None else y + self.bias


class Model(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.left = LoRALayer(IN, 25, 3, 6.0, gen)  # A (3, 26): columns with the helper; B 13/12 rows
        self.right = LoRALayer(IN, 25, 3, 4.0, gen)  # same shapes: a group of two
        self.mid = LoRALayer(25, 7, 1, 2.0, gen)  # r = 1 < world: rank 1 holds no row of A (default)
        self.out = LoRALayer(7, 1, 2, 4.0, gen, bias=True)  # k = 1: rank 1 holds no row of B

    def forward(self, x):
        h = torch.tanh(self.left(x)) + torch.tanh(self.right(x))
        return self.out(torch.tanh(self.mid(h)))


def peft_model(seed=0):
    """PEFT LoRA (r = 3) on an MLP 26 → 25 → 7: lora_A (3, 26) can be column-sharded, (3, 25) not."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(IN, 25), nn.Tanh(), nn.Linear(25, 7), nn.Tanh(), nn.Linear(7, 1))
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False))
    model.base_model.model[4].bias.requires_grad_(True)
    return model


def build(extra, seed=0):
    return peft_model(seed) if extra.get("peft") else Model(seed)


def global_batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(WORLD * LOCAL_BATCH, IN, generator=gen), torch.randn(WORLD * LOCAL_BATCH, 1, generator=gen)


def make_optimizer(model, variant, schedule, extra):
    options = {k: v for k, v in extra.items() if k not in ("nan_at", "peft", "rescale_at")}
    return getattr(altlora, variant)(model, schedule=schedule, backend="torch", other_lr=1e-2, **HPARAMS[variant], **options)


def poison(model, step, extra, rank=None):
    """A NaN in one gradient entry at step ``nan_at``: in the FSDP run only in rank 1's shard."""
    if extra.get("nan_at") != step or rank == 0:
        return
    grad = model.left.lora_B.grad
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    local[-1, 0] = float("nan")


def train_step(model, opt, step, extra, rank=None):
    if extra.get("rescale_at") == step:  # the optimizer must notice and recompute those Grams
        with torch.no_grad():
            model.left.lora_A.mul_(0.5)
            model.mid.lora_A.mul_(0.5)
    x, y = global_batch(step)
    if rank is not None:
        x, y = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    poison(model, step, extra, rank)
    opt.step()
    opt.zero_grad()


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model, opt):
    """Parameters and the LoRA optimizer state, as full tensors (collective: every rank calls it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: full(p) for n, p in model.named_parameters()}
    state = {}
    for p, st in opt.state.items():
        if "gram" in st:
            state[names[id(p)]] = {k: full(v) for k, v in st.items()}
    return {"params": params, "state": state, "skipped": opt.skipped_steps}


def sharded_model(placement, mesh, seed=0, extra={}):
    model = build(extra, seed)
    fn = lora_shard_placement_fn(model, mesh) if placement == "columns" else None
    if not extra.get("peft"):
        for layer in (model.left, model.right, model.mid, model.out):
            fully_shard(layer, mesh=mesh, shard_placement_fn=fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=fn)
    return model


def _count_collectives(opt, model, step, extra, rank):
    """all_reduce / all_gather calls inside one opt.step() (FSDP's own are outside it)."""
    counts = {"all_reduce": 0, "all_gather": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    x, y = global_batch(step)
    x, y = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
    ((model(x) - y) ** 2).mean().backward()
    for name in counts:
        setattr(dist, name, counted(name))
    try:
        opt.step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    opt.zero_grad()
    return counts


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {"runs": {}, "resume": {}, "errors": {}, "collectives": {}, "placements": {}}
        for index, (placement, variant, schedule, extra) in enumerate(CONFIGS):
            if extra.get("peft") and peft is None:
                continue
            model = sharded_model(placement, mesh, extra=extra)
            opt = make_optimizer(model, variant, schedule, extra)
            for step in range(STEPS):
                train_step(model, opt, step, extra, rank)
            results["runs"][index] = snapshot(model, opt)
            if index in RESUME:
                results["resume"][index] = _resume(index, mesh, rank, os.path.join(out_dir, f"ckpt{index}"))
        for placement in ("default", "columns"):
            model = sharded_model(placement, mesh)
            opt = make_optimizer(model, "AltLoRA", "sequential", {})
            train_step(model, opt, 0, {}, rank)
            results["collectives"][placement] = _count_collectives(opt, model, 1, {}, rank)
            results["placements"][placement] = {n: tuple(p.placements) for n, p in model.named_parameters() if "lora" in n}
        results["errors"] = _error_cases(mesh, rank)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        else:
            torch.save(results["errors"], os.path.join(out_dir, "errors1.pt"))
    finally:
        dist.destroy_process_group()


def _resume(index, mesh, rank, path):
    placement, variant, schedule, extra = CONFIGS[index]
    model = sharded_model(placement, mesh, extra=extra)
    opt = make_optimizer(model, variant, schedule, extra)
    for step in range(SAVE_AT):
        train_step(model, opt, step, extra, rank)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    del model, opt
    # Another initialization: everything that matters must come from the checkpoint.
    model = sharded_model(placement, mesh, seed=1, extra=extra)
    opt = make_optimizer(model, variant, schedule, extra)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    for step in range(SAVE_AT, STEPS):
        train_step(model, opt, step, extra, rank)
    return snapshot(model, opt)


def _error_cases(mesh, rank):
    out = {}
    # A Partial (pending-sum) factor cannot be stepped: ValueError naming it.
    A = nn.Parameter(DTensor.from_local(torch.randn(3, 5), mesh, [Partial()], run_check=False))
    B = nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Shard(0)], run_check=False, shape=(8, 3), stride=(3, 1)))
    try:
        altlora.AltLoRA([altlora.LoRAPair(A, B, 1.0, name="bad")], lr=0.1)
        out["partial"] = "no error"
    except ValueError as exc:
        out["partial"] = str(exc)
    # A NaN in rank 1's shard only: both ranks raise (no hang, nothing updated).
    model = sharded_model("columns", mesh)
    opt = make_optimizer(model, "AltLoRA", "alternate", {})
    before = full(model.left.lora_B)
    try:
        train_step(model, opt, 0, {"nan_at": 0}, rank)
        out["nan"] = "no error"
    except FloatingPointError as exc:
        out["nan"] = str(exc)
    out["nan_unchanged"] = bool(torch.equal(before, full(model.left.lora_B)))
    # A cast after building: the sharded groups cannot be rebuilt mid-run, so the next step says
    # so on every rank (FSDP's own forward would fail too; the optimizer must not go silent).
    model = sharded_model("columns", mesh)
    opt = make_optimizer(model, "AltLoRA", "alternate", {})
    train_step(model, opt, 0, {}, rank)
    model.to(torch.float64)
    try:
        opt.step()
        out["cast"] = "no error"
    except RuntimeError as exc:
        out["cast"] = str(exc)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    res = torch.load(tmp / "results.pt", weights_only=False)
    res["errors1"] = torch.load(tmp / "errors1.pt", weights_only=False)
    return res


def reference(index):
    """One process, the global batch, the same optimizer: what FSDP must reproduce."""
    _, variant, schedule, extra = CONFIGS[index]
    model = build(extra)
    opt = make_optimizer(model, variant, schedule, extra)
    for step in range(STEPS):
        train_step(model, opt, step, extra)
    return snapshot(model, opt)


def assert_close(got, want, what):
    for name, w in want.items():
        g = got[name]
        if isinstance(w, dict):
            assert_close(g, w, f"{what}.{name}")
            continue
        assert g.shape == w.shape, f"{what}.{name}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        scale = max(w.double().abs().max().item(), 1.0) if w.numel() else 1.0
        assert err <= 2e-5 * scale, f"{what}.{name}: max |FSDP − single process| = {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_fsdp_equals_single_process(results, index):
    if CONFIGS[index][3].get("peft") and peft is None:
        pytest.skip("peft is not installed")
    got, want = results["runs"][index], reference(index)
    assert set(got["state"]) == set(want["state"]) and len(want["state"]) == (4 if CONFIGS[index][3].get("peft") else 8)
    assert_close(got["params"], want["params"], "params")
    # Grams, cross-Grams, counters and moments, compared as full tensors.
    assert_close(got["state"], want["state"], "state")
    assert got["skipped"] == want["skipped"] == (1 if CONFIGS[index][3].get("nan_at") is not None else 0)


@pytest.mark.parametrize("index", RESUME, ids=[CONFIG_IDS[i] for i in RESUME])
def test_dcp_resume_equals_uninterrupted(results, index):
    resumed, uninterrupted = results["resume"][index], results["runs"][index]
    for name, want in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], want), f"{name} differs after the DCP resume"
    for name, st in uninterrupted["state"].items():
        for key, want in st.items():
            assert torch.equal(resumed["state"][name][key], want), f"state {name}.{key} differs after the DCP resume"


@pytest.mark.parametrize("placement", ["default", "columns"])
def test_collectives_per_step_do_not_grow_with_layers(results, placement):
    # schedule="sequential" (two phases), 4 layers in 3 groups: one agreement; one Gram reduction
    # per phase whose factor is column-sharded somewhere (the B phase always; the A phase only
    # with the helper, which column-shards the A of "left" and "right"); one all-gather for all
    # the row-sharded A factors ("mid" and "out" in both placements: d = 25 and 7 are odd).
    placements = results["placements"][placement]
    assert placements["left.lora_A"] == ((Shard(1),) if placement == "columns" else (Shard(0),))
    assert placements["mid.lora_A"] == placements["out.lora_A"] == placements["left.lora_B"] == (Shard(0),)
    counts = results["collectives"][placement]
    assert counts["all_reduce"] == (2 if placement == "default" else 3), counts
    assert counts["all_gather"] == 1, counts


def test_bad_placement_and_nan_on_one_rank(results):
    for errors in (results["errors"], results["errors1"]):
        assert "bad.lora_A" in errors["partial"] and "Partial" in errors["partial"], errors["partial"]
        assert "non-finite gradient" in errors["nan"], errors["nan"]
        assert errors["nan_unchanged"]
        assert "changed dtype or device after the optimizer was built" in errors["cast"], errors["cast"]
    assert "another rank" in results["errors"]["nan"]  # rank 0 holds no NaN
    assert "left.lora_B" in results["errors1"]["nan"]


def test_placement_helper():
    model = Model()
    fn = lora_shard_placement_fn(model, 2)
    assert fn(model.left.lora_A) == Shard(1)  # d = 26 splits evenly over 2
    assert fn(model.mid.lora_A) is None  # d = 25 does not: FSDP's default Shard(0)
    assert fn(model.left.lora_B) is None and fn(model.out.bias) is None
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_shard_placement_fn(nn.Linear(3, 3), 2)
    with pytest.raises(ValueError, match="mesh"):
        lora_shard_placement_fn(model, "cpu")
