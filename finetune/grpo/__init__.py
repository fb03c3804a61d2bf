"""GRPO with verifiable rewards (`train.objective: grpo`): rollouts, rewards, the policy loss."""
