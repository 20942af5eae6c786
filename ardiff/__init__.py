"""ardiff: the `ardiff` console script and its subcommands (sample, eval, convert-ckpt)."""
