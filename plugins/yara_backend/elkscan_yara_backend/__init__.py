"""elkscan's YARA engine (yara-python) and the project's own default rules."""
