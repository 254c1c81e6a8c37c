"""recipes of longctx."""
