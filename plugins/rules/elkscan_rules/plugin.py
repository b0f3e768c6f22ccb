"""The rules plugin adds no component to a pipeline: what it gives is the ``elkscan rules`` command
(entry point ``rules`` in group ``elkscan.commands``); scans take its bundle as YARA rules
(``rules: [builtin, <state>/rules/current]``)."""
