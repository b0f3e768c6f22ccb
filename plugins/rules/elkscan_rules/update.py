"""``elkscan rules update`` and ``rollback``: fetch every source, vet, build a bundle, switch to it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import attrs

from elkscan_core.bundle import DEFAULT_PASSWORD, SERVER_PLATFORMS, YARA_SUFFIXES, build_bundle
from elkscan_core.errors import ElkscanError

from . import baseline as baseline_mod
from .config import RulesConfig, SourceSpec
from .fetch import FetchError, fetch, new_workdir
from .store import Store, StoreError
from .vet import RuleFile, Vetter

log = logging.getLogger("elkscan.rules")


@attrs.define
class Outcome:
    """What an update did: the state entry of the bundle in use, whether it is new, and the sources
    that could not be fetched (their last good copy was used, or none was there)."""

    entry: dict[str, Any]
    changed: bool
    failed: list[str]


def password(config: RulesConfig) -> str:
    if config.password_env:
        value = os.environ.get(config.password_env)
        if value is None:
            raise ElkscanError(f"environment variable {config.password_env!r} (password_env) is not set")
        return value
    return DEFAULT_PASSWORD


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def update(config: RulesConfig, store: Store, say: Callable[[str], None] = log.info) -> Outcome:
    store.ensure()
    secret = password(config)
    with store.lock():
        started = time.monotonic()
        for leftover in os.listdir(os.path.join(store.path, "tmp")):  # an update that was killed
            shutil.rmtree(os.path.join(store.path, "tmp", leftover), ignore_errors=True)
        work = new_workdir(os.path.join(store.path, "tmp"), "update-")
        try:
            sources, failed = _fetch_all(config, store, work, say)
            return _build(config, store, secret, sources, failed, work, started, say)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _fetch_all(config: RulesConfig, store: Store, work: str, say) -> tuple[list[dict[str, Any]], list[str]]:
    sources, failed = [], []
    for spec in config.sources:
        entry = {"name": spec.name, "kind": spec.kind, "location": spec.location, "ref": spec.ref,
                 "path": spec.path, "preset": spec.preset}
        place = new_workdir(work, f"{spec.name}-")
        began = time.monotonic()
        try:
            fetched = fetch(spec, store.source_dir(spec.name), place, config.limits)
            meta = {"version": fetched.version, "fetched_at": _now()}
            entry.update(meta, tree=store.keep_source(spec.name, fetched.tree, meta), state="ok")
            say(f"source {spec.name}: fetched {fetched.version[:40]} in {time.monotonic() - began:.1f}s")
        except (FetchError, OSError) as exc:
            message = str(exc) if isinstance(exc, ElkscanError) else f"source {spec.name}: {exc}"
            failed.append(message)
            last = store.last_source(spec.name)
            if last is None:
                entry.update(state=f"failed, none kept: {message}", version="", tree="")
                say(f"{message}; no earlier copy, left out")
            else:
                entry.update(last[1], tree=last[0], state=f"stale (last good copy): {message}")
                say(f"{message}; using the copy of {last[1].get('fetched_at', '?')}")
        sources.append(entry)
    return sources, failed


def _candidates(spec: SourceSpec, tree: str, max_files: int) -> tuple[list[RuleFile], list[str]]:
    """The YARA files of a source's tree (at most ``max_files``) and its ClamAV directory if any."""
    if spec.kind == "freshclam":
        return [], [tree]
    found = []
    for directory, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(YARA_SUFFIXES):
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    continue
                found.append(RuleFile(spec.name, os.path.relpath(path, tree), path))
    if len(found) > max_files:
        raise ElkscanError(f"source {spec.name} holds {len(found)} rule files, more than limits.max_files "
                           f"({max_files})")
    return found, []


def _digest(paths: list[str], root: str) -> str:
    sha = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as handle:
            sha.update(os.path.relpath(path, root).encode() + b"\0" + hashlib.sha256(handle.read()).digest())
    return sha.hexdigest()


def _clamav_files(directories: list[str]) -> list[str]:
    return sorted(os.path.join(d, n) for top in directories for d, _, names in os.walk(top) for n in names)


def _build(config: RulesConfig, store: Store, secret: str, sources: list[dict[str, Any]], failed: list[str],
           work: str, started: float, say) -> Outcome:
    specs = {spec.name: spec for spec in config.sources}
    candidates, clamav = [], []
    for source in sources:
        if source["tree"]:
            found, databases = _candidates(specs[source["name"]], source["tree"], config.limits.max_files)
            source["files"] = len(found)
            candidates += found
            clamav += databases
    if not candidates and not clamav:
        raise ElkscanError("no source gave any rule file; the rules in use are unchanged")
    began = time.monotonic()
    benign = baseline_mod.sample(config.vetting.baseline) if candidates else []
    say(f"baseline: {len(benign)} benign files, {sum(b.size for b in benign) / 2**20:.1f} MiB, chosen in "
        f"{time.monotonic() - began:.1f}s")
    vetted_dir = os.path.join(work, "vetted")
    os.mkdir(vetted_dir, 0o700)
    vetted = Vetter(config.vetting, benign, vetted_dir, config.limits.max_file_size, say).run(candidates)
    vetted.seconds["baseline_sample"] = round(time.monotonic() - began - sum(vetted.seconds.values()), 2)
    if not vetted.files and not clamav:
        raise ElkscanError(f"vetting set aside every rule ({len(vetted.set_aside)} entries); the rules in use "
                           "are unchanged (see 'elkscan rules update -v')")
    content = _digest(vetted.files, vetted_dir) + (_digest(_clamav_files(clamav), work) if clamav else "")
    state = store.state()
    current = state.get("current") or {}
    entry = {"version": "", "content": content, "built_at": _now(), "sources": sources,
             "kept": vetted.kept, "files": len(vetted.files), "set_aside": [s.public() for s in vetted.set_aside],
             "warnings": vetted.warnings[:1000], "seconds": vetted.seconds,
             "baseline": {"files": vetted.baseline_files, "sample_files": vetted.sample_files,
                          "sample_bytes": vetted.sample_bytes},
             "budget_ms_per_mib": config.vetting.budget * 1000}
    if current.get("content") == content and os.path.isfile(store.bundle_path(current.get("version", ""))):
        entry.update(version=current["version"], sha256=current.get("sha256", ""),
                     bundle=current.get("bundle", ""), built_at=current.get("built_at", ""),
                     checked_at=_now())
        entry["seconds"]["total"] = round(time.monotonic() - started, 2)
        state["current"] = entry
        entry["directory"] = store.activate(entry["version"], secret)
        store.save_state(state)
        return Outcome(entry, False, failed)
    version = time.strftime("%Y%m%d.%H%M%S", time.gmtime())
    while version in (current.get("version"), (state.get("previous") or {}).get("version")):
        version += "a"
    report = build_bundle(store.bundle_path(version), version=version, password=secret,
                          yara=[vetted_dir] if vetted.files else [], clamav=clamav, platforms=SERVER_PLATFORMS)
    entry.update(version=version, sha256=report.sha256, bundle=report.path)
    entry["seconds"]["total"] = round(time.monotonic() - started, 2)
    directory = store.activate(version, secret)
    entry["directory"] = directory
    state = {"current": entry, "previous": current or None}
    store.save_state(state)
    store.prune({version, current.get("version", "")} - {""})
    return Outcome(entry, True, failed)


def rollback(config_password: str, store: Store) -> dict[str, Any]:
    """Go back to the previous bundle; the one in use becomes the previous one (a second rollback
    undoes the first)."""
    store.ensure()
    with store.lock():
        state = store.state()
        previous, current = state.get("previous"), state.get("current")
        if not previous:
            raise StoreError(f"no previous rules bundle in {store.path} to roll back to")
        previous["directory"] = store.activate(previous["version"], config_password)
        previous["rolled_back_at"] = _now()
        store.save_state({"current": previous, "previous": current})
        return previous
