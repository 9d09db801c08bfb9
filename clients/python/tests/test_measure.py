"""What the client measures, and what it costs in host syncs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradguard._measure import Layers, layer_name

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 4)
        self.frozen = torch.nn.Linear(16, 16).requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.head(self.norm(h)) * self.scale


def backward(net: torch.nn.Module, device: str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    tokens = torch.randint(0, 50, (8, 5), device=device)
    net(tokens).square().mean().backward()


def reference(net: torch.nn.Module, layers: Layers):
    """Per-layer L2, max |g| and non-finite count, one parameter at a time in float64."""
    sq = dict.fromkeys(layers.names, 0.0)
    mx = dict.fromkeys(layers.names, 0.0)
    bad = dict.fromkeys(layers.names, 0)
    for name, p in net.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.double()
        layer = layer_name(name)
        sq[layer] += g.square().sum().item()
        mx[layer] = max(mx[layer], g.abs().max().item())
        bad[layer] += (~torch.isfinite(g)).sum().item()
    return [math.sqrt(sq[n]) for n in layers.names], [mx[n] for n in layers.names], [bad[n] for n in layers.names]


def test_layers_are_modules_in_model_order_without_frozen_ones():
    layers = Layers(Net())
    # A module's own parameters come before its children's (named_parameters order).
    assert layers.names == ["scale", "embed", "blocks.0", "blocks.1", "blocks.2", "norm", "head"]


def test_wrapper_prefixes_do_not_change_layer_names():
    assert layer_name("module._orig_mod.blocks.0.weight") == "blocks.0"
    assert layer_name("module.scale") == "scale"


@pytest.mark.parametrize("device", DEVICES)
def test_per_layer_norms_match_a_per_parameter_reference(device):
    net = Net().to(device)
    backward(net, device)
    layers = Layers(net)
    m = layers.measure(loss=torch.tensor(2.5, device=device), max_abs=True)
    l2, mx, bad = reference(net, layers)
    assert m.layer_l2 == pytest.approx(l2, rel=1e-5)
    assert m.layer_max_abs == pytest.approx(mx, rel=1e-6)
    assert m.layer_nonfinite == bad == [0] * len(l2)
    assert m.grad_norm == pytest.approx(math.sqrt(sum(v * v for v in l2)), rel=1e-6)
    assert m.loss == 2.5 and m.finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_are_accumulated_in_float32(dtype):
    # 10,000 entries of 1000: an L2 norm of 1e5, beyond float16's 65504.
    p = torch.nn.Parameter(torch.zeros(10_000, dtype=dtype))
    p.grad = torch.full_like(p, 1000.0)
    net = torch.nn.Module()
    net.w = p
    m = Layers(net).measure(max_abs=True)
    assert m.grad_norm == pytest.approx(1e5, rel=1e-3) and m.layer_max_abs == [1000.0]


def test_large_cpu_gradients_take_a_dot_and_match_the_reference():
    from gradguard._measure import DOT_MIN_NUMEL

    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    assert net[0].weight.numel() >= DOT_MIN_NUMEL > net[2].weight.numel()
    layers = Layers(net)
    for seed in range(2):  # the second step reuses the cached split
        torch.manual_seed(seed)
        net.zero_grad(set_to_none=True)
        net(torch.randn(32, 256)).square().mean().backward()
        m = layers.measure()
        l2, _, _ = reference(net, layers)
        assert m.layer_l2 == pytest.approx(l2, rel=1e-5)
        assert m.grad_norm == pytest.approx(math.sqrt(sum(v * v for v in l2)), rel=1e-5)

    # A sum of squares beyond float32 (a norm over 1.8e19) is not reported as Inf.
    net[0].weight.grad.fill_(1e19)
    m = layers.measure()
    assert m.finite and m.layer_l2[0] == pytest.approx(math.sqrt(256 * 256 + 0.0) * 1e19, rel=1e-5)

    # The same parameter in half precision on a later step (allowed by
    # grad_dtype = None): accumulated in float32 all the same.
    net[0].weight.grad_dtype = None
    net[0].weight.grad = torch.full((256, 256), 1000.0, dtype=torch.float16)
    assert layers.measure().layer_l2[0] == pytest.approx(256 * 1000.0, rel=1e-3)

    # NaN and Inf in a large gradient are still counted.
    net[0].weight.grad = torch.zeros(256, 256)
    net[0].weight.grad[3, :2] = math.inf
    net[0].weight.grad[4, 0] = math.nan
    m = layers.measure()
    assert not m.finite and m.layer_nonfinite == [3, 0]


def test_max_abs_is_measured_on_accelerators_and_asked_for_on_the_cpu():
    net = Net()
    backward(net, "cpu")
    layers = Layers(net)
    assert layers.measure().layer_max_abs == [], "a second pass over memory on the CPU: off by default"
    assert len(layers.measure(max_abs=True).layer_max_abs) == len(layers.names)


def test_non_finite_values_are_counted_per_layer():
    net = Net()
    backward(net, "cpu")
    net.blocks[1].weight.grad[0, :3] = math.nan
    net.head.bias.grad[1] = math.inf
    layers = Layers(net)
    m = layers.measure()
    assert not m.finite and not math.isfinite(m.grad_norm)
    assert m.layer_nonfinite == reference(net, layers)[2] == [0, 0, 0, 3, 0, 0, 1]


def test_parameters_without_gradients_count_as_zero():
    net = Net()
    backward(net, "cpu")
    net.norm.weight.grad = None
    net.norm.bias.grad = None
    m = Layers(net).measure()
    assert m.layer_l2[5] == 0.0 and m.layer_l2[6] > 0


def test_one_host_copy_per_step_and_never_item(monkeypatch):
    net = Net()
    backward(net, "cpu")
    layers = Layers(net)
    calls = {"tolist": 0, "item": 0}
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counting_tolist(self):
        calls["tolist"] += 1
        return tolist(self)

    def counting_item(self):
        calls["item"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() of a tensor: a host sync"))
    for _ in range(3):
        layers.measure(loss=torch.tensor(1.0), loss_scale=torch.tensor(65536.0), max_abs=True)
    assert calls == {"tolist": 3, "item": 0}


def test_clipping_with_the_measured_norm_matches_clip_grad_norm():
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    backward(a, "cpu")
    backward(b, "cpu")
    layers = Layers(a)
    m = layers.measure()
    layers.scale_grads(1.0 / (m.grad_norm + 1e-6))
    torch.nn.utils.clip_grad_norm_([p for p in b.parameters() if p.requires_grad], 1.0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad)


def test_committed_stubs_match_the_proto():
    pytest.importorskip("grpc_tools", reason="the stub check needs the test extra (grpcio-tools)")
    tool = Path(__file__).resolve().parents[1] / "tools" / "generate_stubs.py"
    out = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
