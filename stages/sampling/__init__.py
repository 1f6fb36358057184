"""Token sampling on the device (`sampler.py`): greedy, temperature, top-k/p, seeds, logprobs."""
