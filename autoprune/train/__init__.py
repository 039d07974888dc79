"""Optimisation for healing and for the dense model: one loop (`loop`), run in the trial's process or by
DeepSpeed workers in the trial's placement group (`deepspeed`)."""
