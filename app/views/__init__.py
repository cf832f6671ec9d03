"""The explorer's pages: one module each, every one with ``render(ctx)``."""
