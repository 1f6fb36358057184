"""overlapd.stages: the four pipeline stages and the engine they drive.

The stages, in step order, joined by bounded queues in `pipeline.py`:
`preprocess.py` (admission, scheduling, the step's inputs), `execute.py`
(the launch), `postprocess.py` (waits for the device output), `emit.py`
(ring record, then client frames). What crosses their boundaries is in
`step_types.py` and `request.py`.

The engine's parts, one subpackage each: `scheduling/` (the scheduler),
`kv/` (block manager, prefix cache), `runner/` (model runner, step inputs,
CUDA graphs), `sampling/`, `spec/` (speculative decoding), `output/`
(output processor, detokenizer), `engine/` (config, sizing, the
synchronous `LLMEngine`), `model/`, `runtime/` (Paddle and Torch ops),
`parallel/` (tensor parallelism), `tokenization/`.
"""
