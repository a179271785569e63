"""Job files are private: directories 0700 (0710 for QEMU's group as root), files 0600, others refused."""
import grp
import os
import pwd
import stat

import pytest

from vmloader.bootstrapper import privatefiles
from vmloader.bootstrapper.errors import VMLoaderError
from vmloader.bootstrapper.privatefiles import Access


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_an_unprivileged_users_dirs_are_owner_only_and_a_roots_let_qemus_group_search():
    assert Access().dir_mode == 0o700
    assert Access(gid=64055, qemu_user="libvirt-qemu").dir_mode == 0o710


def test_a_new_private_dir_is_made_with_the_mode_and_group(tmp_path):
    gid = os.getegid()
    made = privatefiles.private_dir(tmp_path / "state", Access(gid=gid))
    assert mode(made) == 0o710 and os.stat(made).st_gid == gid
    assert mode(privatefiles.private_dir(tmp_path / "mine", Access())) == 0o700


def test_an_existing_wider_dir_of_ours_is_tightened_and_said_so(tmp_path, capsys):
    old = tmp_path / "state"
    old.mkdir()
    os.chmod(old, 0o755)
    privatefiles.private_dir(old, Access())
    assert mode(old) == 0o700
    assert "mode 0755 -> 0700" in capsys.readouterr().err


def test_a_dir_of_another_user_is_refused_and_left_alone(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a directory of another user needs root")
    theirs = tmp_path / "state"
    theirs.mkdir(mode=0o777)
    os.chmod(theirs, 0o777)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(VMLoaderError) as info:
        privatefiles.private_dir(theirs, Access())
    assert "not a directory of your own" in info.value.message and "state_dir" in info.value.hint
    assert mode(theirs) == 0o777 and os.stat(theirs).st_uid == 65534


def test_a_symlink_in_place_of_a_state_dir_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (tmp_path / "state").symlink_to(target)
    with pytest.raises(VMLoaderError, match="not a directory of your own"):
        privatefiles.private_dir(tmp_path / "state", Access())
    assert mode(target) == 0o755


def test_private_files_are_0600_even_when_they_existed_wider_and_never_follow_a_link(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    privatefiles.write_private(path, "{}\n")
    assert mode(path) == 0o600 and path.read_text() == "{}\n"
    (tmp_path / "tail").symlink_to(tmp_path / "victim")
    with pytest.raises(OSError):
        privatefiles.write_private(tmp_path / "tail", b"x")
    assert not (tmp_path / "victim").exists()


def test_qemus_identity_comes_from_qemu_conf(tmp_path):
    conf = tmp_path / "qemu.conf"
    conf.write_text('# user = "nobody"\nuser = "root"\n  group = "+0"\n')
    user, group = privatefiles._qemu_identity(conf)
    assert user == "root" and group.gr_gid == 0


def test_as_root_qemus_group_with_another_member_is_refused(tmp_path, monkeypatch):
    group = grp.struct_group(("qemu-test", "x", 4242, ["libvirt-qemu", "alice"]))
    monkeypatch.setattr(pwd, "getpwall", lambda: [])
    assert privatefiles.other_members(group, "libvirt-qemu") == ["alice"]
    primary = pwd.struct_passwd(("bob", "x", 1001, 4242, "", "/home/bob", "/bin/sh"))
    monkeypatch.setattr(pwd, "getpwall", lambda: [primary])
    assert privatefiles.other_members(grp.struct_group(("q", "x", 4242, [])), "libvirt-qemu") == ["bob"]


def test_as_root_a_shared_qemu_group_refuses_every_job(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("QEMU's group matters to root's jobs only")
    conf = tmp_path / "qemu.conf"
    conf.write_text('user = "nobody"\ngroup = "nogroup"\n')
    monkeypatch.setattr(privatefiles, "other_members", lambda group, user: ["alice"])
    with pytest.raises(VMLoaderError) as info:
        privatefiles.current(conf)
    assert "nogroup" in info.value.message and "alice" in info.value.message and "gpasswd" in info.value.hint
    monkeypatch.setattr(privatefiles, "other_members", lambda group, user: [])
    assert privatefiles.current(conf) == Access(gid=grp.getgrnam("nogroup").gr_gid, qemu_user="nobody")


def test_qemu_must_be_able_to_search_every_parent(tmp_path):
    info = os.stat_result((stat.S_IFDIR | 0o710, 0, 0, 0, 0, 4242, 0, 0, 0, 0))
    assert privatefiles._searchable(info, 64055, {4242})
    assert not privatefiles._searchable(info, 64055, {107})
    info = os.stat_result((stat.S_IFDIR | 0o701, 0, 0, 0, 0, 4242, 0, 0, 0, 0))
    assert privatefiles._searchable(info, 64055, {107}) and not privatefiles._searchable(info, 64055, {4242})
