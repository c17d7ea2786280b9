"""Folder class names meet the store's classes after normalising case, spaces, '-' and '_';
a near miss of a known name is refused as a likely typo unless --new-class-ok names it (#30)."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from ciss.cli import main
from ciss.data.classes import match_names, near_miss, normalise_name
from ciss.data.synthetic import CLASS_NAMES
from ciss.errors import CissError
from ciss.store import Store
from tests.conftest import refused


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_normalised_names_are_the_known_class_and_near_misses_are_refused():
    known = ["background", "checker-disc", "dots-ring"]
    m = match_names(["Checker Disc", "checker_disc ", "new-thing"][::2], known)
    assert m.renames == {"Checker Disc": "checker-disc"} and m.new == ("new-thing",)
    assert normalise_name(" Checker__Disc ") == "checker-disc"
    with pytest.raises(CissError, match="close to the known 'checker-disc'.*--new-class-ok"):
        match_names(["checker-disk"], known)
    assert match_names(["checker-disk"], known, new_ok=["checker-disk"]).new == ("checker-disk",)
    with pytest.raises(CissError, match="are one class"):
        match_names(["Checker-Disc", "checker-disc"], known)


def test_the_synthetic_worlds_classes_are_not_near_misses_of_each_other():
    # one family's classes differ by a word: none may be refused as a typo of another
    assert not [(a, b) for a in CLASS_NAMES for b in CLASS_NAMES if a != b and near_miss(a, b)]


def _renamed_folder(split_dir, tmp_path, name: str):
    """step-1 with its first class renamed to ``name``."""
    folder = tmp_path / "step-1"
    shutil.copytree(split_dir / "step-1", folder)
    lines = (folder / "classes.txt").read_text().split("\n")
    lines[1] = name
    (folder / "classes.txt").write_text("\n".join(lines))
    return folder


def test_add_classes_takes_a_differently_spelled_known_class_as_that_class(store_copy,
                                                                          split_dir, tmp_path):
    known = Store(store_copy).card(0).classes
    spelled = known[3].upper().replace("-", " ")  # e.g. 'CHECKER DISC' for 'checker-disc'
    folder = _renamed_folder(split_dir, tmp_path, spelled)
    res = run("add-classes", "--store", store_copy, "--data", folder, "--iterations", 4,
              "--batch-size", 4, "--quiet")
    assert res.exit_code == 0, res.output
    assert f"class '{spelled}' is the known class '{known[3]}'" in res.output
    classes = Store(store_copy).card(1).classes
    assert spelled not in classes and classes.count(known[3]) == 1
    assert len(classes) == len(known) + 4  # four new classes, not five


def test_add_classes_refuses_a_near_miss_unless_told(store_copy, split_dir, tmp_path):
    known = Store(store_copy).card(0).classes
    typo = known[3][:-1] + ("x" if known[3][-1] != "x" else "y")
    folder = _renamed_folder(split_dir, tmp_path, typo)
    cmd = ("add-classes", "--store", store_copy, "--data", folder, "--iterations", 4,
           "--batch-size", 4, "--quiet")
    refused(run(*cmd), typo, known[3], "--new-class-ok")
    assert Store(store_copy).steps() == [0]  # nothing written
    res = run(*cmd, "--new-class-ok", typo)
    assert res.exit_code == 0, res.output
    assert typo in Store(store_copy).card(1).classes


def test_data_check_matches_folder_names_against_the_store(store_copy, split_dir, tmp_path,
                                                          monkeypatch):
    """#30: 'ciss data check' said "no problems" for a folder whose 'Checker-Disc' add-classes
    would have made a new class; it now matches names against the store's as add-classes does."""
    known = Store(store_copy).card(0).classes
    spelled = known[3].upper().replace("-", " ")
    res = run("data", "check", "--data", _renamed_folder(split_dir, tmp_path / "a", spelled),
              "--store", store_copy)
    assert res.exit_code == 0, res.output
    assert f"class '{spelled}' is the known class '{known[3]}'" in res.output

    typo = known[3][:-1] + ("x" if known[3][-1] != "x" else "y")
    folder = _renamed_folder(split_dir, tmp_path / "b", typo)
    res = run("data", "check", "--data", folder, "--store", store_copy)
    assert res.exit_code == 1, res.output
    assert f"problem: {folder}: class '{typo}'" in res.output
    assert f"known '{known[3]}'" in res.output and "--new-class-ok" in res.output
    res = run("data", "check", "--data", folder, "--store", store_copy, "--new-class-ok", typo)
    assert res.exit_code == 0, res.output

    # no store at the default: names are not compared and nothing is created
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CISS_STORE", raising=False)
    assert run("data", "check", "--data", folder).exit_code == 0
    assert not (tmp_path / "ciss-store").exists()
    refused(run("data", "check", "--data", folder, "--store", tmp_path / "nowhere"),
            "no store at")
