"""Tasks: problems with checkable answers (loaders, prompts, verifiers, the sandbox).

Used by the learner, actor and evaluation processes. Start with `base.py` (the
interface and plug-in loading), `prompts.py` (prompt encoding shared by
training and evaluation) and `scoring.py` (rewards that never crash a run).
"""
