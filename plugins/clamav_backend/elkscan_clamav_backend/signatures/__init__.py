"""The project's own small ClamAV signatures (package data; see docs/clamav.md)."""
