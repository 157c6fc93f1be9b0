"""The actor process (`rapid-actor`): weights in, rollouts out.

Modules:
    loop.py      the `Actor`: hello, weights, work requests, the generate loop
    intake.py    its weight intake: snapshots, queued deltas in order, missed deltas
    rejoin.py    finding the learner again after a timeout or a Rejoin
    rollout.py   prompts -> completions -> scored rollout groups
"""
