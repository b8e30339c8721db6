"""The one list of spaces, presets and options: docs/spaces.md is generated from the code."""

from pathlib import Path

from search_spaces import SPACE_NAMES, catalogue_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "spaces.md"


def test_docs_spaces_page_is_the_code_s_catalogue():
    assert DOC.read_text() == catalogue_markdown(), (
        "docs/spaces.md differs from the code: regenerate it with "
        "`python -m search_spaces --write docs/spaces.md`"
    )


def test_catalogue_lists_every_space_and_experiment_with_its_options():
    from nfpi.presets import EXPERIMENTS

    text = catalogue_markdown()
    for name in (*SPACE_NAMES, *EXPERIMENTS):
        assert f"| `{name}` |" in text, name
    assert "train_set=full\\|released" in text  # options escaped inside the table
