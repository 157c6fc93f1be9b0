"""The learner process (`rapid-learner`): buffer -> mini-batch updates -> weights.

Modules:
    loop.py       the `Learner`: take -> update -> publish -> record
    startup.py    model directory, torch threads, RUN_DIR/learner.json
    resume.py     the work state checkpoints record; resuming
    signals.py    SIGINT / SIGTERM: stop after the current step
    stats.py      clock and network figures of each step's record
    network.py    the network thread that owns the learner's sockets
    control.py    its answers to control messages (hello, heartbeats, requests)
    trainer.py    model, optimizer, one update
    checkpoint.py periodic background checkpoints, rotation, resume
    policy.py     batch collation and the learner's token log-probs
    buffer.py     staleness-aware rollout buffer
    scheduler.py  work hand-out per mode
"""
