"""elkscan's ClamAV engine: signatures judged by clamd, reached over its socket (see README.md)."""
