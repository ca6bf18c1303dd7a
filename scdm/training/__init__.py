"""The training loop, its sample grids and its monitors."""
