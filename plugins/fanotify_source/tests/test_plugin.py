"""Registration, configuration errors, a missing capability, and the pure decision helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elkscan_core import ConfigError, testing
from elkscan_core.plugins import make_plugin_manager
from elkscan_core.registry import Registry
from elkscan_fanotify_source.decoys import login_users
from elkscan_fanotify_source.locations import container_roots, expand
from elkscan_fanotify_source.policy import RateLimit, ScanPolicy


def test_the_entry_point_registers_the_fanotify_source(tools):
    [ep] = [ep for ep in tools.elkscan_entry_points() if ep.name == "fanotify_source"]
    assert ep.value == "elkscan_fanotify_source.plugin"
    registry = Registry.from_plugins(make_plugin_manager(["fanotify_source"]))
    assert registry.get("source", "fanotify", "test").id == "fanotify"


@pytest.mark.parametrize("options, where", [
    ({"file_events": {"profile": "elkeid-3"}},
     "file_events: unknown profile 'elkeid-3' (use one of elkeid, elkeid-2.0, none)"),
    ({"on_access": {"settle": "soon"}}, "sources[0].with.on_access.settle"),
    ({"anti_ransom": {"enable": True}}, "sources[0].with.anti_ransom"),
    ({"file_events": {"rate_limit": -1}}, "sources[0].with.file_events: rate_limit cannot be negative"),
])
def test_bad_options_name_their_place_in_the_pipeline(options, where):
    with pytest.raises(ConfigError) as error:
        testing.run({"plugins": ["fanotify_source"], "sources": [{"use": "fanotify", "with": options}]})
    assert where in str(error.value)


def test_without_cap_sys_admin_start_fails_with_one_clear_line(tmp_path):
    code = ("from elkscan_core import testing\n"
            "testing.run({'plugins': ['fanotify_source'], 'sources': ['fanotify']})\n")
    without = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin"]
    run = subprocess.run([*without, sys.executable, "-c", code],
                         capture_output=True, text=True, env={"ELKSCAN_STATE_DIR": str(tmp_path)})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last == ("elkscan_core.errors.ComponentError: sources[0] (fanotify): fanotify needs "
                    "CAP_SYS_ADMIN to create a notification group: run elkscan as root")


def test_the_rate_limit_is_a_fixed_window_like_elkeids():
    now = [0.0]
    limit = RateLimit(2, 5.0, clock=lambda: now[0])
    assert [limit.allow() for _ in range(3)] == [True, True, False]
    now[0] = 5.0
    assert limit.allow()
    assert RateLimit(0, 5.0).allow()


def test_the_scan_policy_wants_web_scripts_under_web_roots_and_anything_in_downloads():
    policy = ScanPolicy(["/srv/www"], ["php", ".JSP"], ["/tmp"], ["/opt/app/*/uploads/*.bin"])
    assert policy.wants("/srv/www/a/b/index.PHP")
    assert policy.wants("/srv/www/x.jsp")
    assert not policy.wants("/srv/www/style.css")
    assert not policy.wants("/srv/wwwroot/x.php")  # whole path components
    assert policy.wants("/tmp/any/file")
    assert policy.wants("/opt/app/one/uploads/x.bin")
    assert "/opt/app" in policy.roots


def test_container_root_filesystems_come_from_mountinfo(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "90 27 0:50 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=x\n"
        "91 27 0:51 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/def/rootfs rw - overlay o rw\n"
        "92 27 0:52 / /mnt/with\\040space/merged rw - overlay o rw\n")
    assert container_roots(str(mountinfo)) == [
        "/var/lib/docker/overlay2/abc/merged",
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io/def/rootfs", "/mnt/with space/merged"]
    rootfs = tmp_path / "merged"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / "bin").symlink_to("/usr/bin")  # absolute: on the host it points at the host's /usr/bin
    assert expand(["/bin", "/usr/bin"], [str(rootfs)]) == [
        "/usr/bin", str(rootfs / "usr" / "bin")]


def test_login_users_need_a_shell_ending_in_sh_and_a_home_under_the_homes(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("a:x:1:1::/home/a:/bin/bash\nb:x:2:2::/home/b:/bin/false\n"
                      "c:x:3:3::/var/c:/bin/sh\nd:x:x:4::/home/d:/bin/sh\ne:x:5:5::/homes/e:/bin/sh\n")
    assert [u.name for u in login_users(str(passwd), ["/home"])] == ["a"]
