"""elkscan's stdout sink: JSON lines for machines, a table for people."""
