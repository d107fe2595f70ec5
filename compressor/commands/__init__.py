"""Subcommands of `compress` beyond the main run, one module each; cli.py registers them."""
