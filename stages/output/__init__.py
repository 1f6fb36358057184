"""From a step's device output to what clients and the ring receive.

- `processor.py`: `OutputProcessor`, a step's tokens to requests, frames and ring rows;
- `detokenizer.py`: incremental detokenization with stop strings.
"""
