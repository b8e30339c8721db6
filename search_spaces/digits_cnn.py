"""CNN-Acc at toy scale: the ``digits`` flows (data-init, GD, FPI priors) each generate a
digits-sized labelled set (T = 1) on which a ResNet-18 (CIFAR stem) is trained and tested on the
real digits test set; the first trial also trains it on the real digits (the reference row).
About 3-6 minutes per trial on 2 CPU cores."""

from ray import tune

from search_spaces import SearchSpace

SPACE = SearchSpace(
    name="digits_cnn",
    reproduces="Tables 2-3's CNN-Acc comparison at toy scale on digits",
    experiment="digits",
    base={
        "downstream.kind": "cnn",
        "downstream.temperature": 1.0,
        "cnn.model": "resnet18",
        "cnn.epochs": 30,
        "cnn.flip": False,  # glyphs: a mirrored digit is another glyph
        "cnn.crop_padding": 1,  # 1 of 8 pixels, as CIFAR's 4 of 32 (4 would shift half a digit)
        "cnn.batch_size": 100,
    },
    params={
        "variant": tune.grid_search(
            [
                {"prior.method": "data-init", "downstream.reference": True},
                {"prior.method": "gd"},
                {"prior.method": "fpi"},
            ]
        )
    },
    kind="downstream",
)
