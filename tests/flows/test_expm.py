"""The project's matrix exponential (Fréchet-derivative backward) and the fused ELU against
PyTorch's own: values and gradients to round-off, gradcheck in float64, and the MEF layers
unchanged when they switch from ``torch.linalg.matrix_exp`` to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nfpi.flows.conv1x1
import nfpi.flows.coupling
from nfpi.errors import ShapeError
from nfpi.flows import InvConv1x1Exp, MatrixExpCoupling, expm, expm_frechet
from nfpi.flows.coupling import elu_
from nfpi.flows.expm import taylor_plan


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(n: int, c: int, norm: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """n non-normal c x c matrices whose 1-norm is about ``norm``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, c, generator=gen, dtype=torch.float64)
    a = a + torch.triu(torch.randn(n, c, c, generator=gen, dtype=torch.float64), 1) * 3
    a = a / torch.linalg.matrix_norm(a, ord=1)[:, None, None] * norm
    return a.to(dtype)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    dims = (-2, -1)
    return float(((x.double() - ref).norm(dim=dims) / ref.norm(dim=dims)).max())


# c <= 8 runs on the batch-last layout, c > 8 on bmm; norms up to 40 need several squarings.
SIZES = [1, 3, 6, 8, 9, 24]
NORMS = [0.0, 1e-3, 0.5, 2.0, 9.0, 40.0]


@pytest.mark.parametrize("c", SIZES)
@pytest.mark.parametrize("norm", NORMS)
def test_expm_matches_torch_matrix_exp_in_float64(c: int, norm: float) -> None:
    a = _batch(16, c, norm, torch.float64)
    ref = torch.linalg.matrix_exp(a)
    # Forward round-off grows with the squarings (about ||A|| / theta of them).
    assert _rel(expm(a), ref) < 1e-14 * (1 + norm) ** 2


@pytest.mark.parametrize("c", SIZES)
@pytest.mark.parametrize("norm", [1e-3, 0.5, 2.0, 9.0])
def test_backward_matches_autograd_through_matrix_exp(c: int, norm: float) -> None:
    """Float64 to ~1e-13 and float32 to its round-off: the backward is the Fréchet derivative
    of the exponential, like PyTorch's (which exponentiates a 2c x 2c block matrix)."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        a = _batch(8, c, norm, dtype)
        g = _batch(8, c, 1.0, dtype, seed=1)
        ours = a.clone().requires_grad_()
        (expm(ours) * g).sum().backward()
        ref = a.double().requires_grad_()
        (torch.linalg.matrix_exp(ref) * g.double()).sum().backward()
        assert _rel(ours.grad, ref.grad) < tol * (1 + norm) ** 2, (dtype, c, norm)


@pytest.mark.parametrize("c", [2, 6, 12])
@pytest.mark.parametrize("norm", [0.3, 5.0])
def test_gradcheck_float64(c: int, norm: float) -> None:
    a = _batch(3, c, norm, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(expm, (a,))


def test_frechet_derivative_is_the_top_right_block_of_the_block_exponential() -> None:
    a = _batch(4, 5, 3.0, torch.float64)
    e = _batch(4, 5, 1.0, torch.float64, seed=2)
    block = torch.cat([torch.cat([a, e], -1), torch.cat([torch.zeros_like(a), a], -1)], -2)
    ref = torch.linalg.matrix_exp(block)
    x, lx = expm_frechet(a, e)
    assert _rel(x, ref[:, :5, :5]) < 1e-13
    assert _rel(lx, ref[:, :5, 5:]) < 1e-13


def test_batch_shapes_and_the_plan() -> None:
    a = _batch(6, 4, 1.0, torch.float64).reshape(2, 3, 4, 4)
    assert expm(a).shape == (2, 3, 4, 4)
    assert torch.allclose(expm(a), torch.linalg.matrix_exp(a), rtol=0, atol=1e-14)
    assert expm(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    assert torch.equal(expm(torch.zeros(2, 3, 3)), torch.eye(3).expand(2, 3, 3))
    # Larger norms take squarings; float32 needs lower degrees than float64.
    m32, s32 = taylor_plan(0.5, torch.float32)
    m64, s64 = taylor_plan(0.5, torch.float64)
    assert s32 == s64 == 0 and m32 < m64
    assert taylor_plan(100.0, torch.float64)[1] > taylor_plan(1.0, torch.float64)[1]


def test_non_finite_input_gives_non_finite_output_without_hanging() -> None:
    a = torch.full((2, 3, 3), float("nan"))
    assert torch.isnan(expm(a)).all()
    assert torch.isnan(torch.linalg.matrix_exp(a)).all()  # the same as PyTorch


def test_bad_inputs_raise() -> None:
    with pytest.raises(ShapeError, match="square"):
        expm(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="real floating"):
        expm(torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(ShapeError, match="shape"):
        expm_frechet(torch.zeros(2, 3, 3), torch.zeros(1, 3, 3))


# ------------------------------------------------------------------------------------------------
# The layers: the new path against torch.linalg.matrix_exp
# ------------------------------------------------------------------------------------------------


def _run_layer(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, logdet = layer(x)
    (y.square().sum() + logdet.sum()).backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    inv, _ = layer.inverse(y.detach())
    return (y.detach(), logdet.detach(), x.grad, inv, *grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "make",
    [
        lambda g: MatrixExpCoupling((12, 4, 4), hidden=8, blocks=1, generator=g),
        lambda g: MatrixExpCoupling((48, 2, 2), hidden=8, blocks=1, generator=g),
        lambda g: InvConv1x1Exp(12, generator=g),
    ],
    ids=["coupling_c6", "coupling_c24", "conv1x1_c12"],
)
def test_layers_match_the_matrix_exp_path(make, dtype, monkeypatch) -> None:
    """Outputs, log-dets, inverses and every gradient equal the torch.linalg.matrix_exp path's
    to round-off (the couplings' output conv is made non-zero so that M is not 0)."""
    torch.manual_seed(0)
    layer = make(torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "out_" in name or name == "log_weight":
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, *_in_shape(layer), dtype=dtype)
    ours = _run_layer(layer, x)
    for mod in (nfpi.flows.coupling, nfpi.flows.conv1x1):
        monkeypatch.setattr(mod, "expm", torch.linalg.matrix_exp)
    ref = _run_layer(layer, x)
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() <= tol * scale


def _in_shape(layer: torch.nn.Module) -> tuple[int, int, int]:
    if isinstance(layer, InvConv1x1Exp):
        return (layer.channels, 3, 3)
    return layer.in_shape


# ------------------------------------------------------------------------------------------------
# The fused in-place ELU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_elu_matches_torch(dtype, residual) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 4, 4, generator=gen, dtype=dtype) * 3).to(
        memory_format=torch.channels_last
    )
    r = torch.randn(2, 5, 4, 4, generator=gen, dtype=dtype) if residual else None
    g = torch.randn(2, 5, 4, 4, generator=gen, dtype=dtype)

    def run(fn):
        a = x.clone().requires_grad_()
        b = r.clone().requires_grad_() if r is not None else None
        out = fn(a * 1, b)  # a fresh activation (elu_ writes into it)
        (out * g).sum().backward()
        return out.detach(), a.grad, None if b is None else b.grad

    ours = run(elu_)
    ref = run(lambda a, b: F.elu(a if b is None else a + b))
    atol = 1e-15 if dtype == torch.float64 else 2e-7
    for u, v in zip(ours, ref, strict=True):
        if v is None:
            assert u is None
        else:
            torch.testing.assert_close(u, v, rtol=0, atol=atol)
