"""elkscan's process facts: the ``process`` enricher, and ``process_facts()`` for other plugins
(fanotify events, the Elkeid transport) that describe a process by its pid."""

from __future__ import annotations

from .facts import docker_id_from_cgroup, process_facts, read_process

__all__ = ["docker_id_from_cgroup", "process_facts", "read_process"]
