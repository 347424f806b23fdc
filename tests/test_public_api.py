"""The package's public names: each imports, and docs/architecture.md lists exactly ``__all__``."""

import re
from pathlib import Path

import structure_api

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_every_public_name_imports() -> None:
    missing = [name for name in structure_api.__all__ if getattr(structure_api, name, None) is None]
    assert missing == []
    assert len(set(structure_api.__all__)) == len(structure_api.__all__)


def test_architecture_lists_the_public_api() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    # The list runs from the paragraph naming __all__ to the line naming this test.
    section = text[text.index("(`__all__`") : text.index("`tests/test_public_api.py`")]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section)) - {"__all__"}
    # Names given only as what comes from structure_api.standin are not top-level exports.
    listed -= {"Respond", "Drop", "Hang"}
    assert listed == set(structure_api.__all__)


def test_errors_docstring_draws_the_exception_tree() -> None:
    from structure_api import errors

    # Each line "- Name" or "+ Name" sits one level (2 spaces) below its parent's line.
    drawn: dict[str, str] = {}
    parents = ["StructureError"]
    for indent, name in re.findall(r"^( *)[-+] (\w+)", errors.__doc__, re.M):
        depth = len(indent) // 2
        del parents[depth:]
        drawn[name] = parents[-1]
        parents.append(name)
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type)
        and issubclass(cls, errors.StructureError)
        and cls is not errors.StructureError
    }
    assert set(drawn) == set(classes)
    assert {name: cls.__bases__[0].__name__ for name, cls in classes.items()} == drawn


def test_old_spellings_still_work_and_warn() -> None:
    import pytest

    from structure_api import standin
    from structure_api.batch import BatchReport
    from structure_api.pipeline import BatchResult

    with pytest.warns(DeprecationWarning, match="validate_params"):
        assert structure_api.validate_parameters is structure_api.validate_params  # old spelling
    with pytest.warns(DeprecationWarning, match="form_to_job"):
        assert standin.validate_form is standin.form_to_job  # old spelling
    report = BatchReport(total=2, from_store={1})
    with pytest.warns(DeprecationWarning, match="from_store"):
        assert report.from_cache == {1}  # old spelling
    result = BatchResult(images=None, seeds=[], credits=0, from_store=1, report=report)
    with pytest.warns(DeprecationWarning, match="from_store"):
        assert result.from_cache == 1  # old spelling


def test_image_internals_moved_to_structure_api_images_still_import_with_a_warning() -> None:
    import pytest

    from structure_api import images

    assert "as_numpy" not in structure_api.__all__
    with pytest.warns(DeprecationWarning, match="structure_api.images.as_numpy"):
        assert structure_api.as_numpy is images.as_numpy  # old spelling
