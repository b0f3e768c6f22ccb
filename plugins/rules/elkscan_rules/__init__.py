"""elkscan rules: vetted rule updates (docs/rules.md)."""
