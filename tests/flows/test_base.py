"""One test battery for every invertible layer and the flow presets (float64 unless noted)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nfpi.errors import ConfigError, ShapeError
from nfpi.flows import (
    PRESETS,
    ActNorm,
    AffineCoupling,
    AttentionAffineCoupling,
    AttentionMatrixExpCoupling,
    Compose,
    ConvNorm,
    DataInitError,
    Flatten,
    FlowModel,
    InvConv1x1Exp,
    InvConv1x1LU,
    InvertibleLayer,
    MatrixExpCoupling,
    Split,
    Squeeze,
    build_flow,
    data_init,
    registered_layers,
)

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads only add synchronisation (and, on a shared
    # machine, waits for descheduled threads that cost 10-30x).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


Factory = Callable[[torch.Generator], nn.Module]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Registered layer name -> list of (case id, factory(generator) -> layer, input shape without batch).
# Every registered layer must appear here (test_every_layer_is_registered_and_tested).
FACTORIES: dict[str, list[tuple[str, Factory, tuple[int, ...]]]] = {
    "actnorm": [
        ("channel", lambda g: ActNorm((3, 4, 4), mode="channel"), (3, 4, 4)),
        ("element", lambda g: ActNorm((3, 4, 4), mode="element"), (3, 4, 4)),
    ],
    "conv1x1_lu": [("c5", lambda g: InvConv1x1LU(5, generator=g), (5, 3, 3))],
    "conv1x1_exp": [("c5", lambda g: InvConv1x1Exp(5, generator=g), (5, 3, 3))],
    "affine_coupling": [
        ("c5", lambda g: AffineCoupling((5, 4, 4), hidden=8, blocks=1, generator=g), (5, 4, 4))
    ],
    "matrixexp_coupling": [
        ("c6", lambda g: MatrixExpCoupling((6, 4, 4), hidden=8, blocks=2, generator=g), (6, 4, 4))
    ],
    # The release's attention after the coupling net (nfpi.flows.attention).
    "affine_coupling_attention": [
        (
            "c5",
            lambda g: AttentionAffineCoupling((5, 4, 4), hidden=8, blocks=1, heads=2, generator=g),
            (5, 4, 4),
        )
    ],
    "matrixexp_coupling_attention": [
        (
            "c6",
            lambda g: AttentionMatrixExpCoupling(
                (6, 4, 2), hidden=8, blocks=1, heads=3, generator=g
            ),
            (6, 4, 2),
        )
    ],
    "squeeze": [("c2", lambda g: Squeeze(), (2, 4, 6))],
    "flatten": [("c2", lambda g: Flatten((2, 3, 4)), (2, 3, 4))],
    "split": [
        ("plain", lambda g: Split((3, 2, 4)), (3, 2, 4)),
        (
            "nested",
            lambda g: Split(
                (4, 4, 4),
                Compose([ActNorm((2, 4, 4), mode="element"), Squeeze(), Flatten((8, 2, 2))]),
            ),
            (4, 4, 4),
        ),
    ],
    "compose": [
        (
            "step",
            lambda g: Compose(
                [
                    ActNorm((4, 4, 4)),
                    InvConv1x1Exp(4, generator=g),
                    MatrixExpCoupling((4, 4, 4), hidden=8, blocks=1, generator=g),
                ]
            ),
            (4, 4, 4),
        )
    ],
}


def _preset(name: str, **overrides) -> Factory:
    def factory(g: torch.Generator) -> FlowModel:
        seed = int(torch.randint(1000, (1,), generator=g))
        return build_flow(name, in_shape=(1, 8, 8), seed=seed, **overrides)

    return factory


# The whole multi-scale model is a registered layer too: it passes the same battery.
FACTORIES["flow"] = [
    ("tiny-mef", _preset("tiny"), (1, 8, 8)),
    ("glow", _preset("glow-small", levels=2, steps=1, blocks=1, hidden=8), (1, 8, 8)),
    ("tiny-attn", _preset("tiny-attn", steps=1, hidden=8), (1, 8, 8)),
]

CASES = [
    (f"{name}:{cid}", fac, shape) for name, lst in FACTORIES.items() for cid, fac, shape in lst
]


def make(factory: Factory, seed: int = 0, perturb: float = 0.1) -> nn.Module:
    """Build in float64 and perturb every parameter, so that zero-initialised convolutions
    (identity couplings) and identity ActNorms do not hide anything."""
    g = _gen(seed)
    layer = factory(g).to(DTYPE)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g, dtype=DTYPE))
    return layer


def sample(shape: tuple[int, ...], batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=_gen(seed), dtype=DTYPE)


case_params = pytest.mark.parametrize(
    "factory,shape", [pytest.param(f, s, id=i) for i, f, s in CASES]
)


# --------------------------------------------------------------------------------------------
# The contract, for every registered layer and the tiny preset
# --------------------------------------------------------------------------------------------


@case_params
def test_round_trip_shapes_and_dtype(factory: Factory, shape: tuple[int, ...]) -> None:
    layer = make(factory)
    x = sample(shape, 3)
    y, logdet = layer(x)
    assert y.dtype == DTYPE and logdet.dtype == DTYPE
    assert y.shape[0] == 3 and y.numel() == x.numel() and logdet.shape == (3,)
    x_back, logdet_inv = layer.inverse(y)
    assert x_back.shape == x.shape and x_back.dtype == DTYPE and logdet_inv.shape == (3,)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-9, atol=1e-9)
    # The other way round, from a random latent.
    z = torch.randn(y.shape, generator=_gen(7), dtype=DTYPE)
    x_z, ld_inv = layer.inverse(z)
    z_back, ld_fwd = layer(x_z)
    torch.testing.assert_close(z_back, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_fwd, -ld_inv, rtol=1e-9, atol=1e-9)


@case_params
def test_logdet_matches_autograd_jacobian(factory: Factory, shape: tuple[int, ...]) -> None:
    layer = make(factory)
    x = sample(shape, 1)

    def f(v: torch.Tensor) -> torch.Tensor:
        return layer(v.reshape(1, *shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x.reshape(-1))
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(layer(x)[1][0], logabsdet, rtol=1e-8, atol=1e-8)

    # And the inverse direction at the image of x.
    y = layer(x)[0]

    def g(v: torch.Tensor) -> torch.Tensor:
        return layer.inverse(v.reshape(y.shape))[0].reshape(-1)

    _, logabsdet_inv = torch.linalg.slogdet(torch.autograd.functional.jacobian(g, y.reshape(-1)))
    torch.testing.assert_close(layer.inverse(y)[1][0], logabsdet_inv, rtol=1e-8, atol=1e-8)


@case_params
def test_logdet_of_a_sample_ignores_the_rest_of_the_batch(factory, shape) -> None:
    layer = make(factory)
    x = sample(shape, 4)
    y, logdet = layer(x)
    other = x.clone()
    other[[0, 2, 3]] = sample(shape, 3, seed=5)
    y2, logdet2 = layer(other)
    torch.testing.assert_close(y2[1], y[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet2[1], logdet[1], rtol=1e-12, atol=1e-12)
    y1, logdet1 = layer(x[1:2])
    torch.testing.assert_close(y1[0], y[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet1[0], logdet[1], rtol=1e-12, atol=1e-12)


@case_params
def test_gradients_reach_every_parameter(factory: Factory, shape: tuple[int, ...]) -> None:
    layer = make(factory)
    x = sample(shape, 3).requires_grad_()
    y, logdet = layer(x)
    weights = torch.randn(y.shape, generator=_gen(3), dtype=DTYPE)
    ((y * weights).sum() + logdet.sum()).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    missing = [
        n for n, p in layer.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient reaches {missing}"


@case_params
def test_state_dict_round_trip(factory: Factory, shape: tuple[int, ...]) -> None:
    layer = make(factory, seed=0)
    fresh = make(factory, seed=11)
    x = sample(shape, 2)
    if any(True for _ in layer.parameters()):
        assert not torch.allclose(fresh(x)[0], layer(x)[0])
    fresh.load_state_dict(layer.state_dict())
    for a, b in zip(layer(x), fresh(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(layer.inverse(layer(x)[0]), fresh.inverse(layer(x)[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@case_params
def test_memory_format_does_not_change_results(factory, shape) -> None:
    layer = make(factory)
    x = sample(shape, 2)
    if x.ndim != 4:
        return
    y, ld = layer(x)
    y_cl, ld_cl = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_cl, ld, rtol=1e-12, atol=1e-12)


def test_logdet_matches_finite_differences() -> None:
    """FrEIA-style check, independent of autograd: central differences of the matrix-exp
    coupling (the layer with the least obvious log-det)."""
    layer = make(FACTORIES["matrixexp_coupling"][0][1], perturb=0.2)
    shape = (6, 4, 4)
    x = sample(shape, 1).reshape(-1)
    eps = 1e-6
    d = x.numel()
    jac = torch.empty(d, d, dtype=DTYPE)
    with torch.no_grad():
        for i in range(d):
            e = torch.zeros(d, dtype=DTYPE)
            e[i] = eps
            plus = layer((x + e).reshape(1, *shape))[0].reshape(-1)
            minus = layer((x - e).reshape(1, *shape))[0].reshape(-1)
            jac[:, i] = (plus - minus) / (2 * eps)
        logdet = layer(x.reshape(1, *shape))[1][0]
    assert abs(logdet) > 1e-3  # a non-trivial Jacobian, else the check proves little
    torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet, rtol=1e-6, atol=1e-6)


def _invertible_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= _invertible_subclasses(sub)
    return out


def test_every_layer_is_registered_and_tested() -> None:
    registry = registered_layers()
    ours = {c for c in _invertible_subclasses(InvertibleLayer) if c.__module__.startswith("nfpi.")}
    unregistered = sorted(c.__qualname__ for c in ours if c not in registry.values())
    assert not unregistered, f"InvertibleLayer subclasses not registered: {unregistered}"
    untested = sorted(set(registry) - set(FACTORIES))
    assert not untested, f"registered layers without a factory in FACTORIES: {untested}"
    unknown = sorted(set(FACTORIES) - set(registry))
    assert not unknown, f"FACTORIES names that are not registered: {unknown}"
    for name, cases in FACTORIES.items():
        for _, factory, _ in cases:
            assert type(factory(_gen(0))) is registry[name]


# --------------------------------------------------------------------------------------------
# Data-dependent initialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,dims", [("channel", (0, 2, 3)), ("element", (0,))])
def test_actnorm_data_init_standardises_and_runs_once(mode: str, dims: tuple[int, ...]) -> None:
    layer = ActNorm((3, 4, 4), mode=mode).to(DTYPE)
    x = 3.0 + 2.5 * sample((3, 4, 4), 64) * torch.arange(1, 4, dtype=DTYPE)[:, None, None]
    assert not bool(layer.initialized)
    layer.data_init(x)
    assert bool(layer.initialized) and "initialized" in layer.state_dict()
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dims), torch.zeros_like(y.mean(dims)), rtol=0, atol=1e-9)
    torch.testing.assert_close(y.std(dims), torch.ones_like(y.std(dims)), rtol=0, atol=1e-5)
    with pytest.raises(DataInitError, match="already initialised"):
        layer.data_init(x)


def test_convnorm_data_init() -> None:
    g = _gen(0)
    conv = ConvNorm(3, 5, 3, generator=g).to(DTYPE)
    zero = ConvNorm(3, 5, 3, init_scale=0.0, generator=g).to(DTYPE)
    x = 2.0 + 3.0 * sample((3, 6, 6), 32)
    data_init(conv, x)
    data_init(zero, x)
    y = conv(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(5, dtype=DTYPE), rtol=0, atol=1e-9)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(5, dtype=DTYPE), rtol=0, atol=1e-5)
    assert torch.count_nonzero(zero(x)) == 0


def _tiny_model() -> FlowModel:
    return build_flow("tiny", in_shape=(1, 8, 8)).to(DTYPE)


def test_model_data_init_standardises_every_actnorm_and_refuses_a_second_time() -> None:
    flow = _tiny_model()
    x = 0.5 + 0.3 * sample((1, 8, 8), 48)
    outputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: outputs.append(out[0]))
        for m in flow.modules()
        if isinstance(m, ActNorm)
    ]
    flow.data_init(x)
    assert outputs, "no ActNorm in the tiny preset"
    outputs.clear()
    flow(x)
    for h in hooks:
        h.remove()
    for y in outputs:
        torch.testing.assert_close(y.mean(0), torch.zeros_like(y[0]), rtol=0, atol=1e-9)
        torch.testing.assert_close(y.std(0), torch.ones_like(y[0]), rtol=0, atol=1e-5)
    with pytest.raises(DataInitError):
        flow.data_init(x)
    # A checkpoint resume must not re-initialise either.
    resumed = _tiny_model()
    resumed.load_state_dict(flow.state_dict())
    with pytest.raises(DataInitError, match="already initialised"):
        resumed.data_init(x)


def test_data_init_is_deterministic_given_the_batch() -> None:
    x = sample((1, 8, 8), 32)
    a, b = _tiny_model(), _tiny_model()
    a.data_init(x)
    b.data_init(x.clone())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], _tiny_model().state_dict()[k]) for k in sa)


def test_couplings_start_as_identity() -> None:
    flow = _tiny_model()
    flow.data_init(sample((1, 8, 8), 32))
    couplings = [m for m in flow.modules() if isinstance(m, MatrixExpCoupling)]
    assert couplings
    for c in couplings:
        x = sample(c.in_shape, 2)
        y, ld = c(x)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
        torch.testing.assert_close(ld, torch.zeros(2, dtype=DTYPE), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Presets and configuration
# --------------------------------------------------------------------------------------------


def _reference_mef_parameter_count(in_shape=(3, 32, 32), steps=8, blocks=(8, 4, 2), width=128):
    """Parameter count of the MEF reference architecture, written out independently: ActNorm
    per element, exp 1x1 conv, coupling with 4 scalars and a net of conv+Norm layers."""
    c, h, w = in_shape
    total = 0
    for level, nb in enumerate(blocks):
        c, h, w = 4 * c, h // 2, w // 2
        c2 = c // 2
        c1 = c - c2
        conv_norm = lambda i, o, k: i * o * k * k + 2 * o
        net = conv_norm(c1, width, 3) + nb * (
            2 * conv_norm(width, width, 3) + conv_norm(width, width, 1)
        )
        net += width * c2 * (c2 + 1) * 9 + c2 * (c2 + 1)
        total += steps * (2 * c * h * w + c * c + 4 + net)
        if level < len(blocks) - 1:
            c = c - c2
    return total


def test_mef_cifar_matches_the_reference_size() -> None:
    flow = build_flow("mef-cifar")
    n = sum(p.numel() for p in flow.parameters())
    assert n == _reference_mef_parameter_count()
    # The reference reports 42.9 M (within 0.5 %; the remainder is not part of the flow).
    assert abs(n - 42.9e6) / 42.9e6 < 5e-3
    assert flow.latent_dim == 3072 and flow.in_shape == (3, 32, 32)
    assert sum(math.prod(s) for s in flow.latent_layout) == 3072


@pytest.mark.parametrize(
    "preset",
    [pytest.param("mef-cifar", marks=pytest.mark.slow), "glow-small"],  # 43 M parameters
)
def test_large_presets_shapes_and_inverse(preset: str) -> None:
    torch.manual_seed(0)
    flow = build_flow(preset)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    flow.data_init(x)
    with torch.no_grad():
        z, logdet = flow(x[:2])
        assert z.shape == (2, 3072) and z.dtype == torch.float32 and logdet.shape == (2,)
        assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
        x_back, logdet_inv = flow.inverse(z)
    assert x_back.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x_back, x[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 32, 32), (3, 8, 12)])
def test_tiny_preset_shapes(in_shape: tuple[int, int, int]) -> None:
    flow = build_flow("tiny", in_shape=in_shape)
    x = torch.randn(2, *in_shape)
    z, logdet = flow(x)
    assert z.shape == (2, math.prod(in_shape)) == (2, flow.latent_dim) and logdet.shape == (2,)
    torch.testing.assert_close(flow.inverse(z)[0], x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "preset,in_shape,fragment",
    [
        ("mef-cifar", (3, 28, 28), "divisible by 8"),
        ("tiny", (1, 6, 8), "divisible by 4"),
        ("glow-small", (3, 32), "(C, H, W)"),
    ],
)
def test_bad_input_shape_raises(preset: str, in_shape: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(ShapeError) as info:
        build_flow(preset, in_shape=in_shape)
    message = str(info.value)
    assert fragment in message and str(tuple(in_shape)) in message
    if len(in_shape) == 3:
        assert preset in message


def test_wrong_batch_shapes_raise() -> None:
    flow = build_flow("tiny", in_shape=(1, 8, 8))
    with pytest.raises(ShapeError, match=r"\[B, 1, 8, 8\]"):
        flow(torch.randn(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"\[B, 64\]"):
        flow.inverse(torch.randn(2, 63))
    with pytest.raises(ShapeError):
        MatrixExpCoupling((1, 4, 4), hidden=4)
    with pytest.raises(ShapeError):
        Squeeze()(torch.randn(1, 2, 3, 4))
    with pytest.raises(ShapeError):
        ActNorm((2, 4, 4), mode="element").data_init(torch.randn(1, 2, 4, 4))
    with pytest.raises(ShapeError, match=r"\[B, 5, H, W\]"):
        InvConv1x1Exp(5)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ShapeError, match="at least 2"):
        flow.data_init(torch.randn(1, 1, 8, 8))


def test_failed_data_init_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """If data_init fails half-way, no layer may stay marked initialised (else the retry would
    be refused) and no weight may have changed."""
    flow = _tiny_model()
    x = sample((1, 8, 8), 16)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    last = [m for m in flow.modules() if isinstance(m, ActNorm)][-1]

    def boom(x: torch.Tensor) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(last, "_init_from_batch", boom)
    with pytest.raises(RuntimeError, match="boom"):
        flow.data_init(x)
    for k, v in flow.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.undo()
    flow.data_init(x)
    assert all(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        build_flow("tiny", in_shape=(1, 8, 8), widht=32)
    assert info.value.field == "widht"
    with pytest.raises(ConfigError) as info:
        build_flow("tiny", coupling="additive")
    assert info.value.field == "coupling"
    with pytest.raises(ConfigError) as info:
        build_flow("mef-cifar", levels=2)
    assert info.value.field == "steps"
    with pytest.raises(ConfigError) as info:
        build_flow("nope")
    assert info.value.field == "preset"
    with pytest.raises(ConfigError):
        build_flow("tiny", hidden=0)
    flow = build_flow("mef-cifar", levels=2, steps=2, blocks=(1, 1), hidden=8, actnorm="channel")
    assert flow.spec.steps == (2, 2) and flow.spec.actnorm == "channel"
    assert PRESETS["mef-cifar"].steps == (8, 8, 8)  # presets are not mutated
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].hidden = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["affine_coupling", "matrixexp_coupling", "compose"])
def test_parameter_gradients_are_exact(name: str) -> None:
    """gradcheck through the folded conv-norm (custom backward) and in-place ELUs."""
    layer = make(FACTORIES[name][0][1])
    shape = FACTORIES[name][0][2]
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = sample(shape, 2).requires_grad_()

    def f(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
