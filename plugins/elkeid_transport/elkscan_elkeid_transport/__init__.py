"""elkscan's Elkeid transport: a drop-in replacement for Elkeid's ``scanner`` agent plugin."""
