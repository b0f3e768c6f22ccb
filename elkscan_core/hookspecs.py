"""Every hook elkscan calls, grouped by phase.

Each spec's docstring follows one template: a summary, the parameters, what to return, and **When**
it is called. Registration hooks add component classes; lifecycle hooks observe a session. The core
calls components itself, in pipeline order and inside its isolation boundary, so one plugin's bug
cannot stop another's work (pluggy stops a hook call at the first exception).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .bundle import BuildReport
    from .model import Outcome
    from .pipeline import Pipeline
    from .registry import Registration
    from .runner import Session, Summary

PROJECT = "elkscan"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementations: ``@hookimpl def elkscan_register_engines(registry): ...``
hookimpl = pluggy.HookimplMarker(PROJECT)

# -- registration --------------------------------------------------------------------------------


@hookspec
def elkscan_register_sources(registry: Registration) -> None:
    """Register source classes (directory walks, process lists, monitors, task readers).

    :param registry: call ``registry.add(SourceClass)`` for each class; its ``id`` is what a pipeline
        names in ``sources: - use: <id>``.
    :returns: nothing.

    **When**: once per plugin manager, after plugins are loaded and before a pipeline is built.
    """


@hookspec
def elkscan_register_engines(registry: Registration) -> None:
    """Register engine classes (signature and rule matchers).

    :param registry: call ``registry.add(EngineClass)`` for each class; its ``id`` is what a pipeline
        names in ``engines: - use: <id>``.
    :returns: nothing.

    **When**: once per plugin manager, after plugins are loaded and before a pipeline is built.
    """


@hookspec
def elkscan_register_enrichers(registry: Registration) -> None:
    """Register enricher classes (hashes, process facts, anything a researcher wants on a record).

    :param registry: call ``registry.add(EnricherClass)`` for each class; its ``id`` is what a pipeline
        names in ``enrichers: - use: <id>``.
    :returns: nothing.

    **When**: once per plugin manager, after plugins are loaded and before a pipeline is built.
    """


@hookspec
def elkscan_register_sinks(registry: Registration) -> None:
    """Register sink classes (stdout, the Elkeid agent pipe, files, queues).

    :param registry: call ``registry.add(SinkClass)`` for each class; its ``id`` is what a pipeline
        names in ``sinks: - use: <id>``.
    :returns: nothing.

    **When**: once per plugin manager, after plugins are loaded and before a pipeline is built.
    """


# -- configuration -------------------------------------------------------------------------------


@hookspec
def elkscan_configure(pipeline: Pipeline) -> None:
    """Inspect the validated pipeline before any component is created (e.g. to fail early).

    :param pipeline: the parsed, validated pipeline; read-only.
    :returns: nothing; raise ``ConfigError`` to refuse the pipeline with a clear message.

    **When**: once per session, after the pipeline is validated and before components start.
    """


# -- session -------------------------------------------------------------------------------------


@hookspec
def elkscan_session_start(session: Session) -> None:
    """Observe a session whose components have all started.

    :param session: the running session (components, statistics, plugin manager).
    :returns: nothing.

    **When**: once per session, after every component's ``start()`` and before the first target.
    """


@hookspec
def elkscan_component_error(session: Session, outcome: Outcome) -> None:
    """Observe a component call that failed, timed out or returned garbage, or a source's error.

    :param session: the running session.
    :param outcome: which component, which target, what status, how long, and the message.
    :returns: nothing. Exceptions are logged and ignored.

    **When**: on a worker or source thread, each time a failure is recorded, before the record is sent.
    """


@hookspec
def elkscan_session_finish(session: Session, summary: Summary) -> None:
    """Observe the end of a session.

    :param session: the session, with its components already closed.
    :param summary: files scanned, bytes, detections, errors, elapsed seconds.
    :returns: nothing.

    **When**: once per session, after the sinks are flushed and closed.
    """


# -- rule bundles --------------------------------------------------------------------------------


@hookspec(firstresult=True)
def elkscan_default_bundle(output: str, password: str, version: str | None) -> BuildReport | None:
    """Build the default rule bundle from the rules a plugin ships (``elkscan db build --default``).

    :param output: where to write the bundle (its ``.sign`` goes beside it).
    :param password: the bundle's password.
    :param version: the version to write into it, or None for the plugin's own (one that changes exactly
        when its rules do).
    :returns: the ``BuildReport`` of the bundle written, or None when this plugin has no default bundle.

    **When**: ``elkscan db build --default``, with the default pipeline's plugins loaded; the first
    plugin that returns a report wins.
    """


@hookspec(firstresult=True)
def elkscan_compile_hashes(sources: list[str], output: str) -> dict | None:
    """Compile hash lists into one index file a fleet verifier maps (``elkscan db hashes``).

    :param sources: the hash-list files, already found and trust-checked, in order.
    :param output: the index file to write, atomically.
    :returns: ``{"signatures": {algorithm: count}, "skipped": [(path, line, reason), ...], "sha256": hex}``,
        or None when this plugin does not compile hash indexes. Raises ``ElkscanError`` (one line, the
        file and why) when a source cannot be used.

    **When**: ``elkscan db hashes``, with the hash_extractor plugin loaded; the first plugin that
    returns a report wins.
    """
