"""Training: GRPO's formulas (loss), per-token log-probabilities, the partitioned objective, rollout
correction, the GRPO and SFT steps with their pure jitted updates, rejection sampling, and the
train state."""
