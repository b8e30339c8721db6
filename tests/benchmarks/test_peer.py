"""The normflows peer (benchmarks/_peer.py): its width matches the project's parameter count,
and its one-pass class scores are normflows' own ``log_prob`` for every class."""

import importlib
from pathlib import Path

import pytest
import torch

from nfpi.data import dequantization_offset
from nfpi.flows import build_flow

nf = pytest.importorskip("normflows")  # the bench extra; dev installs it too (pyproject.toml)
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def _peer():
    """benchmarks/_peer.py, imported with benchmarks/ on sys.path for this module only."""
    with pytest.MonkeyPatch.context() as m:
        m.syspath_prepend(str(BENCH))
        yield importlib.import_module("_peer")


@pytest.fixture(scope="module")
def peer(_peer):
    ours = build_flow("glow-small", in_shape=(3, 8, 8), hidden=8)
    n_ours = sum(p.numel() for p in ours.parameters())
    model, width, n_peer = _peer.peer_glow(n_ours, ours.spec, (3, 8, 8), k=4, seed=3)
    return model.double(), width, n_peer, n_ours


def test_the_peer_matches_the_parameter_count(peer):
    model, _, n_peer, n_ours = peer
    assert n_peer == sum(p.numel() for p in model.flows.parameters())
    assert abs(n_peer - n_ours) <= 0.05 * n_ours


def test_class_scores_are_normflows_log_prob_for_every_class(peer, _peer):
    model = peer[0]
    gen = torch.Generator().manual_seed(0)
    for q in model.q0:  # classes that differ, so that a mixed-up class shows
        q.loc.data = torch.randn(q.loc.shape, generator=gen, dtype=torch.float64)
        q.log_scale.data = 0.1 * torch.randn(q.log_scale.shape, generator=gen, dtype=torch.float64)
    x = torch.rand(5, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        model.log_prob(x, torch.zeros(5, dtype=torch.long))  # ActNorm's data init, once
        scores = _peer.class_log_probs(model, x)
        expected = torch.stack(
            [model.log_prob(x, torch.full((5,), y, dtype=torch.long)) for y in range(4)], 1
        )
    assert scores.shape == (5, 4)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-9)


def test_bits_per_dim_of_a_uniform_density_is_eight(_peer):
    d = 3 * 8 * 8
    log_p = torch.full((2,), -d * torch.log(torch.tensor(2.0)).item())  # uniform on [-1, 1]^d
    bpd = _peer.bits_per_dim(log_p, d, dequantization_offset(d, 256))
    torch.testing.assert_close(bpd, torch.full((2,), 8.0))
