"""The diffusion math: the noise schedule, timestep respacing, the samplers and the training loss.

`respacing` and `names` are torch-free (the API validates requests with them); the others need torch."""
