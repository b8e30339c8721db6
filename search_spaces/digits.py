"""The embedded default sweep: data-init, GD and FPI priors on scikit-learn's digits (bundled,
no download), tiny MEF flow, CPU; a few minutes on a 2-core machine."""

from search_spaces import prior_comparison

SPACE = prior_comparison(
    "digits",
    "Table 1's comparison (data-init vs GD vs FPI) at toy scale on digits",
    "digits",
)
