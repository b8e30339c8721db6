"""Every search space samples into valid experiment configs; bad values name their field."""

import pytest
from ray import tune

from nfpi.errors import ConfigError
from search_spaces import SPACE_NAMES, SearchSpace, load_space

NEEDS_ROOT = {"data.root": "/data/placeholder"}


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_every_space_samples_into_valid_configs(name):
    space = load_space(name)
    overrides = NEEDS_ROOT if space.experiment in ("cifar10", "cifar100") else {}
    configs = space.validate(overrides)
    assert configs, name
    for sample, config in zip(space.samples(), configs, strict=True):
        flat = config.flat()
        for key, value in space.overrides_of(sample).items():
            if key.startswith(("downstream.", "cnn.")):
                continue  # the downstream config, checked below
            if not isinstance(value, dict):  # whole sub-configs are checked through their leaves
                assert flat[key] == value, (key, value, flat[key])
        if space.kind == "downstream":
            down = space.downstream_for(sample, overrides)
            assert down.kind in ("cnn", "augment")


def test_paper_spaces_vary_what_the_tables_vary():
    t1 = load_space("table1").validate(NEEDS_ROOT)
    assert sorted(c.prior.method for c in t1) == ["data-init", "fpi"] + ["gd"] * 5
    assert {c.prior.gd.policy.name for c in t1 if c.prior.method == "gd"} == {
        "sublinear_v1",
        "sublinear_v2",
        "linear",
        "superlinear_v1",
        "superlinear_v2",
    }
    assert sorted(c.prior.objective.lam for c in load_space("table2").validate(NEEDS_ROOT)) == [
        10,
        50,
        100,
        200,
        300,
        500,
    ]
    t3 = load_space("table3").validate(NEEDS_ROOT)
    assert [(c.prior.method, c.prior.fpi.update, c.prior.fpi.variance_init) for c in t3] == [
        ("data-init", "both", "data"),
        ("fpi", "mean", "identity"),
        ("fpi", "variance", "data"),
        ("fpi", "both", "data"),
    ]
    ap = load_space("alpha_pi").validate(NEEDS_ROOT)
    assert all(0.1 <= c.prior.objective.alpha <= 10 for c in ap) and {
        c.prior.objective.pi for c in ap
    } <= {
        "pairwise",
        "mean",
    }


def test_bad_values_from_a_space_are_rejected_with_the_field_name():
    space = SearchSpace(
        name="bad",
        reproduces="-",
        experiment="smoke",
        base={},
        params={"prior.objective.alpha": tune.grid_search([1.0, -2.0])},
    )
    with pytest.raises(ConfigError, match="prior.objective.alpha"):
        space.validate()
    with pytest.raises(ConfigError, match="prior.gd.policy.name"):
        load_space("digits").config_for(
            {"variant": {"prior.method": "gd", "prior.gd.policy": {"name": "cosine"}}}
        )
    with pytest.raises(ConfigError, match="data.root"):
        load_space("table2").validate()
    with pytest.raises(ConfigError, match="space"):
        load_space("table9")


def test_downstream_spaces_share_flows_with_the_tables_and_vary_the_classifier():
    from search_spaces.table2 import SPACE as TABLE2

    t2 = TABLE2.validate(NEEDS_ROOT)
    t2cnn = load_space("table2_cnn").validate(NEEDS_ROOT)
    assert [c.to_dict() for c in t2] == [c.to_dict() for c in t2cnn]  # the very same flows
    space = load_space("table5_augment")
    downs = [space.downstream_for(s, NEEDS_ROOT) for s in space.samples()]
    combos = {(d.classifier.randaugment, d.classifier.nf_augment is not None) for d in downs}
    assert combos == {(False, False), (False, True), (True, False), (True, True)}
    assert all(d.kind == "augment" for d in downs)
    assert {
        d.classifier.epochs
        for d in (
            load_space("table2_cnn").downstream_for(s, NEEDS_ROOT)
            for s in load_space("table2_cnn").samples()
        )
    } == {50}


def test_flow_spaces_reject_downstream_keys():
    with pytest.raises(ConfigError, match="cnn.epochs"):
        load_space("digits").validate({"cnn.epochs": 3})


def test_spaces_are_discovered_from_the_package_files():
    from pathlib import Path

    import search_spaces

    files = {p.stem for p in Path(search_spaces.__file__).parent.glob("*.py")} - {"__init__"}
    assert set(SPACE_NAMES) == files
    with pytest.raises(ConfigError, match="space"):
        load_space("no_such_space")
