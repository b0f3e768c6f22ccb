"""elkscan engine ``yarax``: YARA rules through YARA-X."""
