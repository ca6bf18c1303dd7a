"""The image and label forward processes, their losses, respacing and the samplers."""
