"""The label painter: `python -m scdm.app --model_path RUN/ema_*.pt` (see `server` and `static/`)."""
