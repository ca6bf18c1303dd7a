"""Label maps and images on disk -> tensors -> the model's conditioning."""
