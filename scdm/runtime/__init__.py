"""How the tools run: files, user errors, stop signals, ranks, logging, flag types."""
