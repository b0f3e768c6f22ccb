"""The project's own default YARA rules (package data; see docs/rules.md)."""
