"""longctx.config: the recipe schema (one section per package, stages) and its one-line errors.

It sits above model, attention, positional, parallel and data (it composes their config
sections) and below checkpoint, eval, trainer and launch, which all read recipes. Reading a
recipe imports neither DeepSpeed nor Ray.
"""
