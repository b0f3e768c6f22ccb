"""Root-safe configuration: what another user can write is refused (sshd's StrictModes)."""

from __future__ import annotations

import os

import pytest

from elkscan_core.trust import UntrustedError, check_trusted, check_trusted_tree

NOBODY = 65534


@pytest.fixture
def private(tmp_path):
    os.chmod(tmp_path, 0o700)
    return tmp_path


def test_own_file_in_private_directory_is_trusted(private):
    path = private / "pipeline.yaml"
    path.write_text("version: 1\n")
    check_trusted(path, "pipeline")


def test_file_owned_by_another_user_is_refused(private):
    path = private / "pipeline.yaml"
    path.write_text("version: 1\n")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UntrustedError, match=r"pipeline .*pipeline.yaml is owned by uid 65534.*chown root"):
        check_trusted(path, "pipeline")


def test_world_writable_file_is_refused(private):
    path = private / "rules.yar"
    path.write_text("rule r { condition: true }\n")
    os.chmod(path, 0o666)
    with pytest.raises(UntrustedError, match="world-writable"):
        check_trusted(path, "rule file")


def test_writable_parent_directory_is_refused(private):
    shared = private / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could swap the file for their own
    path = shared / "pipeline.yaml"
    path.write_text("version: 1\n")
    with pytest.raises(UntrustedError, match=r"shared \(above .*pipeline.yaml\) is world-writable"):
        check_trusted(path, "pipeline")


def test_sticky_directory_above_an_owned_file_is_accepted(private):
    sticky = private / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    path = sticky / "pipeline.yaml"
    path.write_text("version: 1\n")
    check_trusted(path, "pipeline")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UntrustedError):
        check_trusted(path, "pipeline")


def test_link_into_another_users_directory_is_refused(private):
    theirs = private / "theirs"
    theirs.mkdir()
    (theirs / "clamd").write_text("#!/bin/sh\n")
    os.chown(theirs, NOBODY, NOBODY)
    link = private / "clamd"
    link.symlink_to(theirs / "clamd")
    with pytest.raises(UntrustedError, match="theirs .*owned by uid 65534"):
        check_trusted(link, "clamd binary")


def test_tree_with_one_foreign_file_is_refused(private):
    rules = private / "rules"
    (rules / "sub").mkdir(parents=True)
    (rules / "a.yar").write_text("rule a { condition: false }\n")
    (rules / "sub" / "b.yar").write_text("rule b { condition: false }\n")
    check_trusted_tree(rules, "rules directory")
    os.chown(rules / "sub" / "b.yar", NOBODY, NOBODY)
    with pytest.raises(UntrustedError, match="b.yar is owned by uid 65534"):
        check_trusted_tree(rules, "rules directory")


def test_system_paths_are_trusted():
    check_trusted("/usr/sbin/clamd" if os.path.exists("/usr/sbin/clamd") else "/bin/sh", "clamd binary")
