"""Options of ``use: fanotify`` (every one is documented in the plugin's README)."""

from __future__ import annotations

import attrs
from attrs import frozen

from elkscan_core import Duration, Size
from elkscan_core.units import MiB

from .locations import DOWNLOAD_DIRS, PROFILES, WEB_EXTENSIONS, WEB_ROOTS
from .policy import ARGV_WHITELIST, EXE_WHITELIST, SKIP_PATHS, SKIP_SUFFIXES


def _positive(instance, attribute, value) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be more than 0, got {value!r}")


def _profile(instance, attribute, value) -> None:
    if value not in PROFILES:
        raise ValueError(f"unknown profile {value!r} (use one of {', '.join(sorted(PROFILES))})")


def _not_negative(instance, attribute, value) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} cannot be negative, got {value!r}")


@frozen
class FileEventsConfig:
    """``file_events:``: Elkeid 6012 records for files written directly in monitored directories."""

    enabled: bool = True
    profile: str = attrs.field(default="elkeid", validator=_profile)
    directories: list[str] = attrs.field(factory=list)
    containers: bool = True
    skip_suffixes: list[str] = attrs.field(factory=lambda: list(SKIP_SUFFIXES))
    skip_paths: list[str] = attrs.field(factory=lambda: list(SKIP_PATHS))
    exe_whitelist: list[str] = attrs.field(factory=lambda: list(EXE_WHITELIST))
    argv_whitelist: list[str] = attrs.field(factory=lambda: list(ARGV_WHITELIST))
    rate_limit: int = attrs.field(default=10, validator=_not_negative)
    rate_window: Duration = attrs.field(default=Duration(5), validator=_positive)
    hash_max_size: Size = Size(100 * MiB)


@frozen
class OnAccessConfig:
    """``on_access:``: written web scripts and downloads are sent to the engines by their open fd."""

    enabled: bool = True
    web_roots: list[str] = attrs.field(factory=lambda: list(WEB_ROOTS))
    extensions: list[str] = attrs.field(factory=lambda: list(WEB_EXTENSIONS))
    downloads: list[str] = attrs.field(factory=lambda: list(DOWNLOAD_DIRS))
    globs: list[str] = attrs.field(factory=list)
    settle: Duration = attrs.field(default=Duration(0.1), validator=_not_negative)
    max_size: Size = Size(18 * MiB)
    filesystem_marks: bool = True


@frozen
class AntiRansomConfig:
    """``anti_ransom:``: decoy files in login users' homes; a write scans the writer's executable."""

    enabled: bool = False
    passwd: str = "/etc/passwd"
    homes: list[str] = attrs.field(factory=lambda: ["/root", "/home"])
    status_first: Duration = attrs.field(default=Duration(60), validator=_not_negative)
    status_every: Duration = attrs.field(default=Duration(600), validator=_not_negative)


@frozen
class PermissionConfig:
    """``permission:``: hold execs (and, with ``opens``, opens of web scripts) until judged."""

    enabled: bool = False
    opens: bool = False
    budget: Duration = attrs.field(default=Duration(0.2), validator=_positive)


@frozen
class FanotifyConfig:
    """``with:`` of ``use: fanotify``; with no options: Elkeid's directories and default on-access."""

    file_events: FileEventsConfig = FileEventsConfig()
    on_access: OnAccessConfig = OnAccessConfig()
    anti_ransom: AntiRansomConfig = AntiRansomConfig()
    permission: PermissionConfig = PermissionConfig()
    refresh: Duration = attrs.field(default=Duration(60), validator=_positive)
    journal: bool = True
    report_every: Duration = attrs.field(default=Duration(60), validator=_positive)
