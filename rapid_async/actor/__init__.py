"""The actor process (`rapid-actor`): weights in, rollouts out.

Modules:
    loop.py      the `Actor`: hello, weights, work requests, the generate loop
    rollout.py   prompts -> completions -> scored rollout groups
"""
