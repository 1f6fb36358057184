"""The OpenAI-compatible HTTP API and Prometheus metrics, beside the socket server.

Same process, same event loop, same `Engine` (daemon/engine_api.py) as the
socket protocol: `server.py` (aiohttp app and lifecycle), `handlers.py` (the
generation endpoints), `formats.py` (OpenAI response objects), `params.py`
(request -> GenerateParams), `sink.py` (the per-request RequestSink),
`metrics.py` (/metrics), `config.py` ([http] table, API keys).
"""
