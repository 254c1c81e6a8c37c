"""longctx.launch."""
