"""Image builds on one cache take turns (they share debootstrap trees and the built manifest)."""
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
