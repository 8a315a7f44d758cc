"""The network: its configuration, layers, the patched U-Net and its checkpoints (Keras h5, safetensors).

`config` is torch-free (the API validates requests against it); the other modules need torch."""
