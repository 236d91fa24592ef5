"""Never a silent no-op, single process: GC acts on the gradients the update consumes
(closures, changed param groups, double attach, missing gradients), along the output
channel each parameter's role gives (grouped ConvTranspose, weight norm, spectral norm,
parametrizations, LoRA, wrappers), in the right precision, and refuses what it cannot
centralize at attach. Every check states its right value; SGD(lr=1) makes the update
equal the centralized gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dist_gc
from dist_gc import GCConfig
from tests.models import Conv1D
from tests.oracle import oracle_centralize, oracle_centralize_conv_transpose


def _step_with(model: nn.Module, grads: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Attach GC, set the given gradients, SGD(lr=1) step: returns the updates."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    handle = dist_gc.attach(opt, model=model, config=config)
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    for n, g in grads.items():
        named[n].grad = g.clone()
    opt.step()
    handle.remove()
    return {n: (before[n] - p.detach()).double() for n, p in named.items()}


# --------------------------------------------------------------------------- roles
def test_grouped_conv_transpose_one_mean_per_output_filter():
    m = nn.ConvTranspose1d(2, 2, 2, groups=2, bias=False)  # weight (in=2, out/groups=1, k=2)
    upd = _step_with(m, {"weight": torch.tensor([[[1.0, 3.0]], [[10.0, 30.0]]])})
    # Output filter 0 is weight[0, 0, :] = [1, 3] (mean 2), filter 1 is weight[1, 0, :]
    # = [10, 30] (mean 20): the centralized gradient is [[[-1, 1]], [[-10, 10]]].
    torch.testing.assert_close(upd["weight"], torch.tensor([[[-1.0, 1.0]], [[-10.0, 10.0]]], dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: nn.ConvTranspose1d(6, 4, 3, groups=2),
    lambda: nn.ConvTranspose1d(4, 4, 3, groups=4),          # depthwise
    lambda: nn.ConvTranspose2d(6, 9, (2, 3), groups=3),
    lambda: nn.ConvTranspose3d(4, 2, 2, groups=2),
])
def test_grouped_conv_transpose_matches_oracle(make):
    torch.manual_seed(0)
    m = make()
    g = torch.randn(m.weight.shape) + torch.linspace(-1, 2, m.weight.shape[1]).view(1, -1, *[1] * (m.weight.dim() - 2))
    upd = _step_with(m, {"weight": g, "bias": torch.randn(m.bias.shape)})
    want = oracle_centralize_conv_transpose(g, m.groups)
    torch.testing.assert_close(upd["weight"], want, rtol=0, atol=1e-5)
    # An ungrouped mean over dim 1 (what an output_dim override alone gives) is wrong.
    assert float((oracle_centralize(g, "channel", 1) - want).abs().max()) > 1e-2


def _row_means(update: torch.Tensor, output_dim: int) -> float:
    """Max |mean| of the update's channels along ``output_dim``, relative to the update's
    size: the update ``w0 - w1`` of fp32 weights carries fp32 rounding of ``|w1|``, so
    "zero" means below ~1e-6 of the update's magnitude."""
    dims = tuple(i for i in range(update.dim()) if i != output_dim % update.dim())
    return float(update.mean(dims).abs().max()) / max(1.0, float(update.abs().max()))


def test_weight_norm_direction_and_spectral_norm_original_use_the_layers_output_dim():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5) + 1.0
    for wrap, name, skipped in [
        (torch.nn.utils.weight_norm, "weight_v", "weight_g"),
        (torch.nn.utils.parametrizations.weight_norm, "parametrizations.weight.original1", "parametrizations.weight.original0"),
        (torch.nn.utils.spectral_norm, "weight_orig", None),
    ]:
        m = wrap(nn.ConvTranspose1d(2, 3, 1))  # output dim 1 of a (2, 3, 1) weight
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # weight_norm's deprecation
            handle = dist_gc.attach(opt, model=m)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        (m(x) ** 2).sum().backward()
        opt.step()
        p = dict(m.named_parameters())[name]
        upd = (before[name] - p.detach()).double()
        assert name in handle.stats.centralized, (name, handle.stats)
        assert _row_means(upd, 1) < 1e-6, f"{wrap.__name__}: {name} not centralized along dim 1"
        assert _row_means(upd, 0) > 1e-4  # dim 0 (the wrong axis) is not what was removed
        if skipped:
            assert "magnitude" in handle.stats.skipped[skipped], handle.stats.skipped


def test_lora_b_is_left_alone_by_default_and_names_are_the_base_models():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.q_proj(x)

    def train(config: dict | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = dist_gc.attach(opt, model=model, config=config)
        gen = torch.Generator().manual_seed(1)
        target = torch.randn(8, 8, generator=gen)
        for _ in range(30):
            x = torch.randn(16, 8, generator=gen)
            opt.zero_grad()
            ((model(x) - x @ target.T) ** 2).mean().backward()
            opt.step()
        lora = model.base_model.model.q_proj
        delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        return torch.linalg.svdvals(delta.detach().double()), handle, caught

    sv, handle, caught = train(None)
    assert "q_proj.lora_B.weight" in handle.stats.skipped and "LoRA B" in handle.stats.skipped["q_proj.lora_B.weight"]
    assert "q_proj.lora_A.weight" in handle.stats.centralized
    assert any("LoRA B" in str(w.message) for w in caught), "the LoRA default must be said once"
    assert float(sv[3]) > 1e-3, f"the adapter update must keep all 4 ranks, singular values {sv.tolist()}"
    # Opting in (an explicit include pattern) centralizes lora_B: B @ 1_r = 0 removes a rank.
    sv_gc, handle, _ = train({"include": ["*lora_B*", "*lora_A*"]})
    assert "q_proj.lora_B.weight" in handle.stats.centralized
    assert float(sv_gc[3]) < 1e-6, sv_gc.tolist()


def test_output_dims_seen_through_wrappers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deconv = nn.ConvTranspose1d(2, 3, 2)
            self.proj = Conv1D(5, 4)  # HF-style: weight (in=4, out=5), output dim -1

    compiled = torch.compile(Net())  # parameters under _orig_mod.; no forward, no compile
    opt = torch.optim.SGD(compiled.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=compiled)
    targets = handle.plan.targets
    assert targets["deconv.weight"].output_dim == 1 and targets["proj.weight"].output_dim == 1, targets
    assert targets["proj.weight"].role.kind == "Conv1D.weight"


# --------------------------------------------------------------------------- precision
def test_float64_statistics_are_accumulated_in_float64():
    m = nn.Linear(2, 1, bias=False).double()
    upd = _step_with(m, {"weight": torch.tensor([[1.0, 1.0 + 2**-30]], dtype=torch.float64)})
    # fp32 sums would leave a mean of about -4.7e-10; fp64 leaves none.
    assert abs(float(upd["weight"].mean())) < 1e-15, float(upd["weight"].mean())


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("layer", [nn.Embedding(5, 3, sparse=True), nn.EmbeddingBag(5, 3, sparse=True)])
def test_sparse_embedding_refused_at_attach_naming_parameter_and_remedy(layer):
    model = nn.Sequential(layer, nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match=r"'0\.weight'.*sparse.*exclude"):
        dist_gc.attach(opt, model=model)
    handle = dist_gc.attach(opt, model=model, config={"exclude": ["0.weight"]})  # the remedy works
    assert "0.weight" in handle.stats.skipped


# --------------------------------------------------------------------------- step-time truth
def test_closure_is_centralized_after_its_backward_with_fresh_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model)
    raw_means = []
    for step in range(3):
        x = torch.randn(6, 5) + step  # a different batch (and gradient mean) every step

        def closure():
            opt.zero_grad()
            loss = (model(x) ** 2).sum() + model(x).sum()
            loss.backward()
            raw_means.append(max(float(p.grad.mean(1).abs().max()) for n, p in model.named_parameters() if p.dim() == 2))
            return loss

        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step(closure)
        for n, p in model.named_parameters():
            if p.dim() == 2:  # right value: each row of the update has mean 0
                assert _row_means((before[n] - p.detach()).double(), 0) < 1e-6, (step, n)
        # The stats describe THIS step's gradients, not the previous one's.
        assert handle.stats.max_abs_mean_before == pytest.approx(raw_means[-1], rel=1e-5), (step, handle.stats)
        assert handle.stats.step == step + 1


def test_new_param_group_is_replanned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model)
    opt.add_param_group({"params": model[1].parameters()})  # unfreezing mid-training
    before = model[1].weight.detach().clone()
    (model(torch.randn(5, 4) + 1) ** 2).sum().backward()
    opt.step()
    assert _row_means((before - model[1].weight.detach()).double(), 0) < 1e-6, "the new group's update must be centralized"
    assert handle.replans == 1 and "1.weight" in handle.stats.centralized


def test_second_attach_on_the_same_optimizer_raises():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    first = dist_gc.attach(opt, model=model)
    with pytest.raises(ValueError, match="already attached.*remove"):
        dist_gc.attach(opt, model=model)
    first.remove()
    dist_gc.attach(opt, model=model).remove()  # after remove() attaching again is fine


def test_step_without_any_planned_gradient_raises_naming_parameters():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dist_gc.attach(opt, model=model)
    with pytest.raises(RuntimeError, match=r"none of the 2 parameters.*0\.weight"):
        opt.step()
    # A few missing gradients (an unused layer) are allowed and counted.
    model[0].weight.grad = torch.ones(2, 3)
    opt.step()


def test_attach_says_in_one_line_what_gc_does(capfd):
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

    model = nn.Sequential(nn.Linear(4, 3), Custom())
    dist_gc.attach(torch.optim.SGD(model.parameters(), lr=1.0), model=model)
    err = capfd.readouterr().err
    line = next(ln for ln in err.splitlines() if "GC ON" in ln)
    assert "single process" in line and "mode=channel" in line and "2 tensor(s) centralized" in line
    assert "1.w (Custom.w: dim 0)" in line, line  # an unrecognised module's assumption is said
    dist_gc.attach(torch.optim.SGD(model.parameters(), lr=1.0), model=model, config={"enabled": False})
    assert "GC OFF" in capfd.readouterr().err
