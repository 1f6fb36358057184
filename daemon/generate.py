"""`overlapd generate`: one prompt, streamed to stdout.

Without `--socket` it starts the pipeline in this process (same stages, same
model code as the daemon, no ring); with `--socket` it asks a running daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from overlapd.daemon.engine_options import add_engine_arguments, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--socket", metavar="PATH", help="send the request to a running daemon at PATH")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the model's chat template")
    add_engine_arguments(parser)


def _request_fields(args: argparse.Namespace) -> dict:
    return dict(
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
    )


async def _in_process(args: argparse.Namespace) -> int:
    from overlapd.daemon.engine_api import EngineError, GenerateParams
    from overlapd.daemon.logs import configure_cli_logging
    from overlapd.daemon.sinks import PrintSink, RequestFailed
    from overlapd.stages.pipeline import Pipeline
    from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

    configure_cli_logging()
    depth = {"overlap_depth": args.overlap_depth} if args.overlap_depth is not None else {}
    try:
        pipeline = Pipeline(engine_config_from_args(args), PipelineConfig(overlap=not args.no_overlap, **depth),
                            RingConfig(enabled=False))
    except ValueError as exc:  # a model that cannot load (ModelLoadError), a bad setting
        print(f"overlapd generate: {exc}", file=sys.stderr)
        return 1
    await pipeline.start()
    sink = PrintSink(asyncio.get_running_loop())
    fields = _request_fields(args)
    try:
        if args.chat:
            fields["prompt"] = pipeline.render_chat([{"role": "user", "content": args.prompt}])
        pipeline.submit(GenerateParams(**fields), sink)
        reason = await sink.done
        summary, ok = f"{reason}: {sink.usage[0]} prompt + {sink.usage[1]} generated tokens", True
    except EngineError as exc:
        summary, ok = f"{exc.code}: {exc.message}", False
    except RequestFailed as exc:
        summary, ok = str(exc), False
    except ValueError as exc:  # the chat template refused the message
        summary, ok = f"invalid_request: {exc}", False
    finally:
        await pipeline.drain(timeout=0)
    print(file=sys.stdout)
    print(f"[{summary}]", file=sys.stderr)
    return 0 if ok else 1


def _via_socket(args: argparse.Namespace) -> int:
    from overlapd.daemon.client import Client, ClientError
    from overlapd.daemon.protocol import DoneFrame, ErrorFrame, TokensFrame

    try:
        with Client(args.socket) as client:
            for event in client.generate(**_request_fields(args)):
                if isinstance(event, TokensFrame):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, DoneFrame):
                    print()
                    usage = event.usage
                    print(
                        f"[{event.finish_reason}: {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens]",
                        file=sys.stderr,
                    )
                    return 0
                elif isinstance(event, ErrorFrame):
                    print()
                    print(f"overlapd generate: {event.code}: {event.message}", file=sys.stderr)
                    return 1
    except (ClientError, OSError) as exc:
        print(f"overlapd generate: {args.socket}: {exc}", file=sys.stderr)
        return 1
    return 1


def run(args: argparse.Namespace) -> int:
    if args.socket and args.chat:
        # The socket protocol takes text or ids; the template lives with the model in the daemon.
        print("overlapd generate: --chat runs the model in this process; it cannot be combined with --socket "
              "(render the conversation yourself, or use the daemon's HTTP chat endpoint)", file=sys.stderr)
        return 2
    if args.socket:
        return _via_socket(args)
    import uvloop

    return uvloop.run(_in_process(args))
