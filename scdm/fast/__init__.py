"""How the network runs fast: exact fast paths, their autotuning and its cache, precision."""
