"""Scale readiness: torch.compile without graph breaks, low-precision retractions, the GPU script."""

import pytest
import torch

from experiments import bench_gpu
from manifolds import LayerNormSphere, Sphere
from svflow_ode.lm import SVFlowLM


def _lm(**kw):
    return SVFlowLM(**{"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_blocks": 2, "context": 8, **kw})


@pytest.mark.parametrize("method,gradient,steps", [
    ("euler", "backprop", 4), ("rk4", "checkpoint", 4), ("euler", "checkpoint", 8), ("heun", "backprop", 4),
])  # 8 checkpointed steps: two levels (segments of 3)
def test_fixed_step_path_compiles_without_graph_breaks(method, gradient, steps):
    torch._dynamo.reset()
    model = _lm(method=method, steps=steps, gradient=gradient)
    ids = torch.randint(0, 20, (2, 8))
    explained = torch._dynamo.explain(lambda ids: model(ids).logits)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    # And the compiled function (through AOT autograd) computes what eager does, gradients too.
    compiled = torch.compile(lambda ids: model(ids).logits, backend="aot_eager", fullgraph=True)
    out_c = compiled(ids)
    out_c.square().mean().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_e = model(ids).logits
    out_e.square().mean().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("manifold", [Sphere(None), Sphere(3.0), LayerNormSphere()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_retraction_normalises_in_float32(manifold, dtype):
    x = (torch.randn(64, 4096) * 30).to(dtype)  # a sum of squares that 16 bits cannot hold well
    y = manifold.projx(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, manifold.projx(x.float()).to(dtype), rtol=0, atol=0)
    radius = manifold.r(x)
    assert (y.float().norm(dim=-1) / radius - 1).abs().max() < 1e-2


def test_bf16_autocast_training_step_stays_finite_and_close_to_float32():
    model = _lm(norm="post_ln", method="rk4")
    ids = torch.randint(0, 20, (4, 8))
    ref = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss.item() - ref.item()) < 0.05
    assert out.last_hidden_state.dtype == torch.float32  # the residual stream keeps its precision


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    bench_gpu.main(["--device", "cpu", "--tiny", "--repeats", "1", "--out", str(tmp_path)])
    text = (tmp_path / "gpu_bench_tiny.md").read_text()
    for name in ("SVFlow euler", "SVFlow rk4", "plain Transformer"):
        assert name in text
    assert (tmp_path / "gpu_bench_tiny.json").exists()
