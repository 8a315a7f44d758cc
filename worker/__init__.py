"""RQ workers that keep models loaded across jobs and run the diffusion loop."""
