"""NF augmentation: the class-PCA mixing maths (float64, flow-free) and the batch transform
through a real tiny flow."""

import pytest
import torch

from nfpi.checkpoint import load_trained
from nfpi.data import load_dataset
from nfpi.downstream import ClassPCA, NFAugment, NFAugmentConfig
from nfpi.errors import ConfigError, InsufficientSamplesError, LabelRangeError, ShapeError

K, D, R = 3, 12, 4


@pytest.fixture(scope="module")
def latents():
    """Anisotropic class gaussians in float64: 60 latents per class."""
    g = torch.Generator().manual_seed(0)
    zs, ys = [], []
    for k in range(K):
        mean = 3 * torch.randn(D, generator=g, dtype=torch.float64)
        basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
        scales = torch.logspace(1, -1, D, dtype=torch.float64)
        eps = torch.randn(60, D, generator=g, dtype=torch.float64)
        zs.append(mean + (eps * scales) @ basis.T)
        ys.append(torch.full((60,), k))
    return torch.cat(zs), torch.cat(ys)


@pytest.fixture(scope="module")
def pca(latents):
    return ClassPCA.from_latents(*latents, num_classes=K, n_components=R)


def _pairs(latents, n=9, seed=1):
    z, y = latents
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(K, (n,), generator=g)
    pick = lambda: torch.stack(
        [z[y == k][torch.randint(60, (1,), generator=g)].squeeze(0) for k in labels.tolist()]
    )
    return pick(), pick(), labels


def test_fit_matches_the_sample_covariance(pca, latents):
    z, y = latents
    assert pca.means.dtype == pca.axes.dtype == torch.float64
    assert tuple(pca.axes.shape) == (K, D, R) and pca.counts.tolist() == [60] * K
    for k in range(K):
        zk = z[y == k]
        assert torch.allclose(pca.means[k], zk.mean(0), atol=1e-12)
        u = pca.axes[k]
        assert torch.allclose(u.T @ u, torch.eye(R, dtype=torch.float64), atol=1e-12)
        cov = torch.cov(zk.T)
        eig = torch.linalg.eigvalsh(cov).flip(0)
        assert torch.allclose(pca.variances[k], eig[:R], rtol=1e-10)
        # Each axis is an eigenvector: cov u = lambda u.
        assert torch.allclose(cov @ u, u * pca.variances[k], atol=1e-9)
        assert torch.allclose(pca.total_variance[k], cov.trace(), rtol=1e-12)
    ratio = pca.explained_variance_ratio()
    assert bool(((ratio > 0) & (ratio <= 1)).all())


def test_decomposition_is_mean_plus_coordinates_plus_orthogonal_residual(pca, latents):
    z1, _, y = _pairs(latents)
    c, rho = pca.project(z1, y), pca.residual(z1, y)
    u, m = pca.axes[y], pca.means[y]
    assert torch.allclose(m + torch.einsum("bdr,br->bd", u, c) + rho, z1, atol=1e-12)
    assert torch.einsum("bdr,bd->br", u, rho).abs().max() < 1e-12


def test_mix_at_weight_zero_is_the_first_latent_exactly(pca, latents):
    z1, z2, y = _pairs(latents)
    assert torch.equal(pca.mix(z1, z2, y, 0.0), z1)
    assert torch.equal(pca.mix(z1, z2, y, torch.zeros(len(y), dtype=torch.float64)), z1)
    assert torch.equal(pca.mix(z1, z2, y, torch.zeros(len(y), R, dtype=torch.float64)), z1)


def test_mix_at_weight_one_takes_the_partners_coordinates_and_keeps_the_residual(pca, latents):
    z1, z2, y = _pairs(latents)
    out = pca.mix(z1, z2, y, 1.0)
    expected = pca.means[y] + torch.einsum("bdr,br->bd", pca.axes[y], pca.project(z2, y))
    assert torch.allclose(out, expected + pca.residual(z1, y), atol=1e-12)
    assert torch.allclose(pca.project(out, y), pca.project(z2, y), atol=1e-12)
    assert torch.allclose(pca.residual(out, y), pca.residual(z1, y), atol=1e-12)


@pytest.mark.parametrize("per_axis", [False, True])
def test_mixed_minus_kept_residual_lies_in_the_class_affine_subspace(pca, latents, per_axis):
    z1, z2, y = _pairs(latents, n=12, seed=3)
    g = torch.Generator().manual_seed(5)
    shape = (len(y), R) if per_axis else (len(y),)
    w = torch.rand(shape, generator=g, dtype=torch.float64)
    out = pca.mix(z1, z2, y, w)
    on_subspace = out - pca.residual(z1, y) - pca.means[y]
    u = pca.axes[y]
    # Distance of (mixed - rho_1) from m_y + span(U_y) is round-off.
    off = on_subspace - torch.einsum("bdr,br->bd", u, torch.einsum("bdr,bd->br", u, on_subspace))
    assert off.abs().max() < 1e-12
    # and its coordinates are the convex mix of the endpoints'.
    wc = w if per_axis else w[:, None]
    expected = (1 - wc) * pca.project(z1, y) + wc * pca.project(z2, y)
    assert torch.allclose(pca.project(out, y), expected, atol=1e-12)


def test_mix_and_fit_reject_bad_input(pca, latents):
    z1, z2, y = _pairs(latents)
    with pytest.raises(ShapeError):
        pca.mix(z1, z2[:-1], y, 0.5)
    with pytest.raises(ShapeError):
        pca.mix(z1, z2, y, torch.zeros(len(y), R + 1, dtype=torch.float64))
    with pytest.raises(LabelRangeError):
        pca.mix(z1, z2, torch.full_like(y, K), 0.5)
    z, labels = latents
    with pytest.raises(InsufficientSamplesError, match="class 0"):
        ClassPCA.from_latents(z[:3], labels[:3], K, n_components=R)


def test_state_dict_round_trip_and_float32_mixing(pca, latents):
    again = ClassPCA.from_state_dict(pca.state_dict())
    z1, z2, y = _pairs(latents)
    assert torch.equal(again.mix(z1, z2, y, 0.3), pca.mix(z1, z2, y, 0.3))
    out32 = pca.mix(z1.float(), z2.float(), y, 0.3)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), pca.mix(z1, z2, y, 0.3), atol=1e-4)


def test_weight_distributions():
    g = lambda: torch.Generator().manual_seed(0)
    const = NFAugmentConfig(weights="constant", weight_param=0.25).sample_weights(5, 4, g())
    assert const.tolist() == [0.25] * 5
    uni = NFAugmentConfig(weights="uniform", weight_param=0.5, per_axis=True)
    w = uni.sample_weights(1000, 4, g())
    assert w.shape == (1000, 4) and 0 <= float(w.min()) and float(w.max()) <= 0.5
    beta = NFAugmentConfig(weights="beta", weight_param=0.4)
    a, b = beta.sample_weights(4000, 4, g()), beta.sample_weights(4000, 4, g())
    assert torch.equal(a, b)  # reproducible from the torch generator
    assert a.shape == (4000,) and abs(float(a.mean()) - 0.5) < 0.03
    assert 0 <= float(a.min()) and float(a.max()) <= 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_components": 0}, "n_components"),
        ({"weights": "gauss"}, "weights"),
        ({"weights": "uniform", "weight_param": 1.5}, "weight_param"),
        ({"weights": "beta", "weight_param": 0.0}, "weight_param"),
        ({"weights": "constant", "weight_param": -0.1}, "weight_param"),
        ({"probability": 1.1}, "probability"),
        ({"partner": "anyone"}, "partner"),
        ({"per_class_fit_samples": 4, "n_components": 4}, "per_class_fit_samples"),
        ({"seed": -1}, "seed"),
        ({"per_axis": 1}, "per_axis"),
        ({"checkpoint": 3}, "checkpoint"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    # The field's own name; inside a classifier config it is "nf_augment.<field>" (and
    # "cnn.nf_augment.<field>" in a downstream config: see test_downstream).
    with pytest.raises(ConfigError) as err:
        NFAugmentConfig(**kwargs)
    assert err.value.field == field


def test_config_dict_round_trip():
    cfg = NFAugmentConfig(n_components=3, weights="beta", weight_param=0.2, checkpoint="/x")
    assert NFAugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as err:
        NFAugmentConfig.from_dict({"n_componets": 3})
    assert err.value.field == "n_componets"
    with pytest.raises(ConfigError) as err:
        NFAugmentConfig.from_dict({"n_componets": 3}, path="nf_augment")
    assert err.value.field == "nf_augment.n_componets"


# ---------------------------------------------------------------------- through a real flow
@pytest.fixture(scope="module")
def flow_setup(checkpoint):
    model = load_trained(checkpoint)
    train, _ = load_dataset("digits", "train", items_per_class=20)
    assert model.info.levels == 17  # digits: 17 grey levels, which every encoding must use
    pca = ClassPCA.fit(
        model.flow, train, 10, 4, per_class_samples=12, batch_size=32, levels=model.info.levels
    )
    return model, train, pca, checkpoint


def _batch(train, n=40, seed=0):
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.stack([train[i][0] for i in idx.tolist()])
    return x, train.targets[idx]


def test_fit_through_the_flow(flow_setup):
    _, _, pca, _ = flow_setup
    assert tuple(pca.axes.shape) == (10, 64, 4) and pca.counts.tolist() == [12] * 10
    assert torch.isfinite(pca.means).all() and bool((pca.variances > 0).all())


def test_p_zero_returns_the_input_batch(flow_setup):
    model, train, pca, _ = flow_setup
    aug = NFAugment(model.flow, pca, NFAugmentConfig(n_components=4, probability=0.0), train, 17)
    x, y = _batch(train)
    out = aug(x, y, torch.Generator().manual_seed(0))
    assert out is x and aug.stats["augmented"] == 0


def test_weight_zero_round_trips_and_weight_one_changes_images(flow_setup):
    model, train, pca, _ = flow_setup
    x, y = _batch(train)
    zero = NFAugmentConfig(n_components=4, probability=1.0, weights="constant", weight_param=0.0)
    out = NFAugment(model.flow, pca, zero, train, 17)(x, y, torch.Generator().manual_seed(0))
    # Bin-centre encoding + exact inverse: w = 0 gives back every pixel.
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, x)

    one = NFAugmentConfig(n_components=4, probability=1.0, weights="constant", weight_param=1.0)
    aug = NFAugment(model.flow, pca, one, train, 17)
    out = aug(x, y, torch.Generator().manual_seed(0))
    assert int(out.max()) <= 16  # mixed images stay 17-level digits
    assert out.dtype == torch.uint8 and out.shape == x.shape
    changed = (out != x).flatten(1).any(dim=1)
    assert int(changed.sum()) > len(x) // 2
    assert aug.stats["augmented"] + aug.stats["nonfinite"] == len(x)


def test_partners_come_from_the_same_class(flow_setup):
    model, train, pca, _ = flow_setup
    # Two images per class, p = 1, w = 1 per axis: the augmented latent's principal coordinates
    # are the partner's; with one same-class partner in the batch, that partner is the other.
    x, y = _batch(train, n=200, seed=3)
    keep = torch.cat([torch.nonzero(y == k, as_tuple=True)[0][:2] for k in range(10)])
    x, y = x[keep], y[keep]
    cfg = NFAugmentConfig(n_components=4, probability=1.0, weights="constant", weight_param=1.0)
    aug = NFAugment(model.flow, pca, cfg, train)
    out = aug(x, y, torch.Generator().manual_seed(1))
    assert aug.stats["dataset_partners"] == 0
    flow = model.flow
    with torch.no_grad():
        enc = lambda im: flow((im.float() - 127.5) / 128)[0]  # at bin centres
        c_in, c_out = pca.project(enc(x), y), pca.project(enc(out), y)
    partner = torch.arange(len(y)) ^ 1  # rows come in same-class pairs (2k, 2k + 1)
    assert torch.equal(y[partner], y)
    # Coordinates of the output are close to the partner's (quantisation aside), not its own.
    to_partner = (c_out - c_in[partner]).norm(dim=1)
    to_self = (c_out - c_in).norm(dim=1)
    assert bool((to_partner < to_self).float().mean() > 0.9)


def test_dataset_partners_when_the_batch_has_none(flow_setup):
    model, train, pca, _ = flow_setup
    x = torch.stack([train[int(torch.nonzero(train.targets == k)[0])][0] for k in range(10)])
    y = torch.arange(10)
    cfg = NFAugmentConfig(n_components=4, probability=1.0, weights="constant", weight_param=1.0)
    aug = NFAugment(model.flow, pca, cfg, train)
    out = aug(x, y, torch.Generator().manual_seed(0))
    assert aug.stats["dataset_partners"] == 10 and out.shape == x.shape
    lonely = NFAugment(model.flow, pca, cfg, dataset=None)
    assert torch.equal(lonely(x, y, torch.Generator().manual_seed(0)), x)
    assert lonely.stats["no_partner"] == 10


def test_augmentation_is_reproducible_by_generator(flow_setup):
    model, train, pca, _ = flow_setup
    x, y = _batch(train)
    cfg = NFAugmentConfig(n_components=4, probability=0.5, weights="beta", weight_param=0.5)
    aug = NFAugment(model.flow, pca, cfg, train)
    a = aug(x, y, torch.Generator().manual_seed(7))
    b = aug(x, y, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_from_checkpoint(flow_setup):
    _, train, _, checkpoint = flow_setup
    cfg = NFAugmentConfig(n_components=3, per_class_fit_samples=10, checkpoint=str(checkpoint))
    aug = NFAugment.from_checkpoint(cfg, train)
    assert aug.pca.n_components == 3 and aug.pca.counts.tolist() == [10] * 10
    assert aug.levels == 17  # the grey levels come from the checkpoint, not a default
    with pytest.raises(ConfigError) as err:
        NFAugment.from_checkpoint(NFAugmentConfig(n_components=3), train)
    assert err.value.field == "nf_augment.checkpoint"
