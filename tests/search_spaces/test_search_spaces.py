"""Every search space samples into valid experiment configs; bad values name their field."""

import pytest
from ray import tune

from nfpi.errors import ConfigError
from search_spaces import SPACE_NAMES, SearchSpace, load_space

NEEDS_ROOT = {"data.root": "/data/placeholder"}


def _needs(space):
    """What a space needs from the command line: a dataset path, required keys."""
    out = {} if space.experiment in ("digits", "smoke") else dict(NEEDS_ROOT)
    return {**out, **{key: "/placeholder" for key in space.required}}


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_every_space_samples_into_valid_configs(name):
    space = load_space(name)
    overrides = _needs(space)
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
    with pytest.raises(ConfigError, match="cnn.pretrained_path"):
        load_space("table6_eva02").validate(NEEDS_ROOT)


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

    files = {p.stem for p in Path(search_spaces.__file__).parent.glob("*.py")}
    files -= {"__init__", "__main__"}  # the package and its catalogue command
    assert set(SPACE_NAMES) == files
    with pytest.raises(ConfigError, match="space"):
        load_space("no_such_space")


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("name", [n for n in SPACE_NAMES if load_space(n).options])
def test_every_option_value_builds_valid_configs(name):
    space = load_space(name)
    for key, values in space.options.items():
        assert space.chosen[key] == values[0]  # the module's SPACE is the default choice
        for value in values:
            chosen, rest = space.with_options({key: value, **NEEDS_ROOT})
            assert chosen.chosen[key] == value and rest == NEEDS_ROOT and chosen.name == name
            assert space.validate({key: value, **_needs(space)})


def test_options_are_validated_with_the_key_and_dataset_is_not_data_name():
    space = load_space("table3")
    with pytest.raises(ConfigError) as err:
        space.validate({"variant": "faithful", **NEEDS_ROOT})
    assert err.value.field == "variant" and "as_released" in err.value.allowed
    with pytest.raises(ConfigError) as err:
        space.validate({"data.name": "cifar100", **NEEDS_ROOT})
    assert err.value.field == "data.name" and "dataset=cifar100" in err.value.allowed
    # Another dataset through ImageFolder is fine (Table 5/6 on JPEG trees).
    assert load_space("table5_swin").validate({"data.name": "imagefolder", **NEEDS_ROOT})
    with pytest.raises(ConfigError, match="variant"):
        load_space("digits").validate({"variant": "paper"})  # no options: a config key


def test_table1_rows_per_dataset_variant_and_gd_weights():
    t1 = load_space("table1")

    def rows(**options):
        return t1.validate({**options, **NEEDS_ROOT})

    for dataset, update, start, lam in (("cifar10", "both", "data", 3333), ("cifar100", "mean",
                                        "identity", 758)):  # fmt: skip
        configs = rows(dataset=dataset)
        fpi = [c for c in configs if c.prior.method == "fpi"]
        assert len(fpi) == 1 and fpi[0].data.name == dataset
        assert (fpi[0].prior.fpi.update, fpi[0].prior.fpi.variance_init) == (update, start)
        assert round(fpi[0].prior.objective.lam) == lam and fpi[0].prior.fpi.form == "reference"
        # GD at equal objective: lambda, alpha, pi of the FPI row.
        for c in configs:
            if c.prior.method == "gd":
                assert c.prior.objective_for("gd") == fpi[0].prior.objective
    paper = rows(variant="paper")
    assert [c.prior.fpi.form for c in paper if c.prior.method == "fpi"] == ["paper"]
    # Data-init and GD rows do not depend on the variant: both variants share those flows.
    released = rows()
    assert [c.to_dict() for c in released[:-1]] == [c.to_dict() for c in paper[:-1]]
    weights = rows(gd_weights="as_released")
    gd = [c.prior for c in weights if c.prior.method == "gd"]
    assert len(gd) == 5 and all(p.objective_for("gd").lam == 50.0 for p in gd)
    assert all(p.gd.lam_end == 25.0 for p in gd)


def test_table2_and_table3_per_dataset():
    from nfpi.presets import TABLE2_LAMBDAS

    t2 = load_space("table2").validate({"dataset": "cifar10", **NEEDS_ROOT})
    assert [c.prior.objective.lam for c in t2] == list(TABLE2_LAMBDAS["cifar10"])
    assert [round(lam) for lam in TABLE2_LAMBDAS["cifar10"]] == [111, 556, 1111, 2222, 3333, 5556]
    assert {c.prior.fpi.update for c in t2} == {"both"} and {c.data.name for c in t2} == {"cifar10"}
    for dataset, epochs, lams in (("cifar10", 30, [5556, 1111, 3333]), ("cifar100", 50,
                                  [758, 202, 303])):  # fmt: skip
        space = load_space("table3_cnn")
        configs = space.validate({"dataset": dataset, **NEEDS_ROOT})
        assert [round(c.prior.objective.lam) for c in configs[1:]] == lams
        assert [c.name for c in configs] == [
            f"{dataset}_data_init",
            f"{dataset}_mean_as_released",
            f"{dataset}_var_as_released",
            f"{dataset}_mean_var_as_released",
        ]
        chosen, _ = space.with_options({"dataset": dataset})
        downs = [chosen.downstream_for(s, NEEDS_ROOT) for s in chosen.samples()]
        assert {d.classifier.epochs for d in downs} == {epochs}
    paper = load_space("table3").validate({"variant": "paper", **NEEDS_ROOT})
    assert [c.prior.fpi.form for c in paper[1:]] == ["paper"] * 3
    assert [c.prior.fpi.auto_bounds != () for c in paper[1:]] == [True] * 3


def test_table5_swin_and_table6_eva02_recipes():
    swin = load_space("table5_swin")
    downs = [swin.downstream_for(s, NEEDS_ROOT) for s in swin.samples()]
    c = downs[0].classifier
    assert (c.model, c.optimizer, c.schedule, c.max_lr, c.weight_decay) == (
        "swin_tiny_patch4_window7_224", "adamw", "cosine", 2e-3, 5e-2)  # fmt: skip
    assert (c.batch_size, c.epochs, c.model_kwargs["img_size"]) == (256, 1000, 32)
    assert {(d.classifier.autoaugment, d.classifier.nf_augment is not None) for d in downs} == {
        (None, False), (None, True), ("cifar10", False), ("cifar10", True)}  # fmt: skip
    eva = load_space("table6_eva02")
    needs = _needs(eva)
    downs = [eva.downstream_for(s, needs) for s in eva.samples()]
    c = downs[0].classifier
    assert (c.model, c.optimizer, c.max_lr, c.grad_clip, c.batch_size, c.epochs) == (
        "eva02_base_patch14_448", "sgd", 1e-5, 1.0, 64, 3)  # fmt: skip
    assert c.pretrained_path == "/placeholder" and c.input_size == 448
    assert {(d.classifier.randaugment, d.classifier.nf_augment is not None) for d in downs} == {
        (False, False), (True, False), (False, True), (True, True)}  # fmt: skip
    assert eva.config_for(eva.samples()[0], needs).data.name == "imagefolder"


def test_sweep_takes_options_and_rejects_bad_ones_before_running(tmp_path):
    from ray_jobs.sweep import main as sweep_main

    base = ["--space", "table3", "--results-dir", str(tmp_path), "--set", "data.root=/x"]
    with pytest.raises(ConfigError, match="variant"):
        sweep_main([*base, "--set", "variant=faithful"])
    with pytest.raises(ConfigError, match="dataset=cifar100"):
        sweep_main([*base, "--set", "data.name=cifar100"])
    # A trial re-selects the space from the same overrides it receives.
    space, _ = load_space("table3").with_options({"dataset": "cifar100", "variant": "paper"})
    trial = space.samples()[1]
    config = load_space("table3").config_for(trial, {"dataset": "cifar100", "variant": "paper",
                                                     "data.root": "/x"})  # fmt: skip
    assert config.name == "cifar100_mean_paper" and config.prior.fpi.form == "paper"
