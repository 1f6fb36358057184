"""The engine as one object: its settings, its sizing, and the synchronous loop.

- `config.py`: `EngineConfig`, every setting and buffer bound;
- `sizing.py`: how long a sequence may get, how many KV blocks fit;
- `llm_engine.py`: `LLMEngine`, scheduler + runner + output processor in one
  loop (in-process use and tests; the daemon drives the same parts through
  the four stages).
"""
