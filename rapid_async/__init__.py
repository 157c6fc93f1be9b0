"""rapid_async: asynchronous actor-learner RL (RAPID) for small language models.

Processes: the actor (`rapid_async.actor`, inference) and the learner
(`rapid_async.learner`, training) talk over ZeroMQ; `rapid_async.launch` starts
both on one node. The loss math lives in `rapid_async.loss`.
"""

__version__ = "0.1.0"
