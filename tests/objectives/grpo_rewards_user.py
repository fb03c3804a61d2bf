"""User reward functions for tests/objectives/test_grpo_rewards.py (imported as `module:function`)."""


def length_bonus(prompts, completions, **columns):
    return [min(len(c), 10) / 10 for c in completions]


def fails_on_blue(prompts, completions, **columns):
    return [1.0 / (c != "blue") for c in completions]  # ZeroDivisionError on "blue"


def too_few(prompts, completions, **columns):
    return [1.0]


def echo_column(prompts, completions, difficulty, **columns):
    return [float(d) for d in difficulty]
