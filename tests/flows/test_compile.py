"""``torch.compile`` of a flow: one graph (the CPU's hand-written in-place ELU, which Dynamo
cannot trace, and the matrix exponential's host-side Taylor plan, which broke the graph and
recompiled for every new norm, step aside while compiling), and the compiled flow's latents,
log-determinants and gradients equal the eager flow's in float64."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from nfpi.flows import build_flow


def _flow(preset: str = "tiny") -> torch.nn.Module:
    flow = build_flow(preset, in_shape=(3, 8, 8), hidden=8, seed=0).double()
    gen = torch.Generator().manual_seed(1)
    flow.data_init(torch.rand(16, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1)
    return flow


@pytest.mark.parametrize("preset", ["tiny", "glow-small"])  # MEF layers (expm), affine Glow
def test_a_flow_traces_as_one_graph(preset):
    torch._dynamo.reset()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    explained = torch._dynamo.explain(_flow(preset))(x)
    reasons = [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_the_compiled_flow_equals_the_eager_flow_in_float64():
    torch._dynamo.reset()
    flow = _flow()
    compiled = torch.compile(flow, dynamic=False)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x * 2 - 1

    def run(net):
        flow.zero_grad(set_to_none=True)
        z, logdet = net(x)
        (z.square().sum() - logdet.sum()).backward()
        return z.detach(), logdet.detach(), [p.grad.clone() for p in flow.parameters()]

    z0, ld0, g0 = run(flow)
    z1, ld1, g1 = run(compiled)
    torch.testing.assert_close(z1, z0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld1, ld0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
