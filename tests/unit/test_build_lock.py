"""Image builds on one cache take turns: at a recipe's debootstrap tree, and at assembling (the built manifest)."""
import threading

import pytest

from vmloader.bootstrapper import build, catalog
from vmloader.bootstrapper.cache import ImageCache


def _entry() -> catalog.ImageEntry:
    return catalog.load_manifest(catalog.EMBEDDED_MANIFEST).find("debian-12")


def test_a_second_build_waits_for_the_first_and_says_so(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    said, entered = [], threading.Event()
    with build._one_build_at_a_time(cache, said.append):
        second = threading.Thread(target=lambda: build._one_build_at_a_time(cache, said.append).__enter__()
                                  or entered.set())
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not entered.is_set()      # still waiting: the lock is held
    second.join(timeout=30)
    assert entered.is_set()
    assert said == ["waiting for another image build in this cache to finish"]
    assert not (tmp_path / "cache" / "build.lock").is_symlink()


def test_an_image_built_while_waiting_is_not_built_again(tmp_path, monkeypatch):
    cache = ImageCache(tmp_path / "cache")
    entry = _entry()
    answers = iter([None, entry])                   # absent before the lock, present after it
    monkeypatch.setattr(build, "_up_to_date", lambda *a: next(answers))

    def must_not_build(*args):
        raise AssertionError("built twice")
    monkeypatch.setattr(build, "_build_locked", must_not_build)
    monkeypatch.setattr(build, "_debootstrap", lambda *a: tmp_path / "tree")
    said = []
    assert build.build_image(entry, cache, progress=said.append) is entry
    assert "built while waiting" in said[-1]


def test_the_lock_is_never_taken_through_a_link(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    cache.ensure_dirs()
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "cache" / "build.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="build.lock"):
        with build._one_build_at_a_time(cache, lambda m: None):
            pass
    assert (tmp_path / "elsewhere").read_text() == ""


def _recipe(suite: str) -> catalog.Recipe:
    return catalog.Recipe(suite=suite, packages=("python3-minimal",))


def _enters_at_once(lock, timeout: float) -> bool:
    """Whether a thread entering `lock` (a context manager) gets in within `timeout` s (it leaves at once)."""
    entered = threading.Event()

    def enter():
        with lock:
            entered.set()
    threading.Thread(target=enter, daemon=True).start()
    return entered.wait(timeout)


def test_builds_of_two_recipes_debootstrap_at_once(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    said = []
    with build._one_debootstrap_of(_recipe("bullseye"), cache, said.append):
        assert _enters_at_once(build._one_debootstrap_of(_recipe("trixie"), cache, said.append), 30)
        assert _enters_at_once(build._one_build_at_a_time(cache, said.append), 30)   # and assemble meanwhile
    assert said == []


def test_builds_of_one_recipe_take_turns_at_its_tree_and_say_so(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    said = []
    with build._one_debootstrap_of(_recipe("trixie"), cache, said.append):
        assert not _enters_at_once(build._one_debootstrap_of(_recipe("trixie"), cache, said.append), 1.0)
        assert said == ["waiting for another build's debootstrap of trixie in this cache"]
    lock = build.tree_path(cache.root, _recipe("trixie")).with_suffix(".lock")
    assert lock.is_file() and not lock.is_symlink()
