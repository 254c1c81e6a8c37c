"""bench of longctx."""
