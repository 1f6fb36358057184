"""The execute side of a step: SchedulerOutput in, StepOutput out.

- `model_runner.py`: `ModelRunner`, a step's launch and its device output;
- `step_stager.py`: the host half (a filled staging buffer, no device work);
- `input_batch.py`: persistent host staging and address-stable device buffers;
- `decode_graphs.py`: CUDA graphs per (rows, context) bucket;
- `stop_flags.py`: stop conditions checked on the device.
"""
