"""Benchmark drivers (run by the scripts in bin/, never by the runtime path).

Modules:
    modes.py     grpo vs rapid-sync vs rapid-async on the CPU task
    engines.py   hf vs vllm generation and weight-update time
    mc.py        Monte Carlo bias / variance of the loss
"""
