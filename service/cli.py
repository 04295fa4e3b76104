"""The `sluice` command: `serve` runs the server; `chat`, `generate`, `tokenize`, `moderate` and `info` talk
to one over gRPC (`--target host:port`).

This is a composition root, like `service/__main__.py`: it is where the environment is read. Client
commands use the blocking client: a terminal is one conversation at a time, and Ctrl-C then simply
cancels the call in flight (which frees the server's slot).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from service._pb.sluice.v1 import common_pb2, generation_pb2, moderation_pb2
from service.client import ClientTls, SluiceClient, as_complete_request, build_generate_request
from service.config import Config, ConfigError, load_config

DEFAULT_TARGET: Final = "127.0.0.1:50051"
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # shell convention for SIGINT
TOKEN_ENV: Final = "SLUICE_AUTH_TOKEN"  # the server's variable, so one exported token serves both


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sluice` console script.

    Args:
        argv: arguments without the program name (default: sys.argv[1:]).

    Returns:
        Process exit code.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        # `serve` has its own parser, generated from the config schema (`sluice serve --help`).
        return serve(args_list[1:], os.environ)
    args = build_parser().parse_args(args_list)
    command: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.command
    try:
        return command(args, os.environ)
    except grpc.RpcError as err:
        print(f"sluice: {err.code().name}: {err.details()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def serve(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """`sluice serve`: load and validate the configuration, then run the server until it stops.

    Args:
        argv: the flags after `serve`.
        env: the process environment.

    Returns:
        The server's exit code, or 2 when the configuration is invalid.
    """
    try:
        config = load_config(argv, env)
    except ConfigError as err:
        for problem in err.problems:
            print(f"sluice serve: {problem}", file=sys.stderr)
        return EXIT_USAGE
    # Imported late so the client commands never load the engine; `run(config) -> int` is the server's
    # entry point (service/app.py).
    run: Callable[[Config], int] = importlib.import_module("service.app").run
    return run(config)


def build_parser() -> argparse.ArgumentParser:
    """The client commands' parser (`serve` is listed for --help but parsed by `serve()`).

    Returns:
        The parser; each subcommand sets `command`.
    """
    parser = argparse.ArgumentParser(prog="sluice", description="Streaming text generation over gRPC.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the server (`sluice serve --help` lists every setting)", add_help=False)
    connection = _connection_options()
    sampling = _sampling_options()

    chat = sub.add_parser("chat", parents=[connection, sampling], help="interactive chat, streamed")
    chat.add_argument("--system", help="system message for the conversation")
    chat.set_defaults(command=_chat)

    generate = sub.add_parser("generate", parents=[connection, sampling], help="one answer to one prompt")
    generate.add_argument("prompt", help="the prompt ('-' reads standard input)")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    generate.add_argument("--json", action="store_true", help="print the response (text, final) as JSON")
    generate.set_defaults(command=_generate)

    tokenize = sub.add_parser("tokenize", parents=[connection], help="token ids of a text")
    tokenize.add_argument("text", help="the text ('-' reads standard input)")
    tokenize.add_argument("--chat", action="store_true", help="tokenize as a user chat message (template)")
    tokenize.add_argument("--json", action="store_true", help="print the response as JSON")
    tokenize.set_defaults(command=_tokenize)

    moderate = sub.add_parser("moderate", parents=[connection], help="judge a conversation with the guard")
    moderate.add_argument("turns", nargs="+", help="turns, alternating user / assistant, user first")
    moderate.add_argument("--role", choices=("user", "agent"), help="whose turn to judge (default: the last)")
    moderate.add_argument("--json", action="store_true", help="print the response as JSON")
    moderate.set_defaults(command=_moderate)

    info = sub.add_parser("info", parents=[connection], help="model, guard policy and limits (JSON)")
    info.set_defaults(command=_info)
    return parser


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"server host:port (default {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per call, seconds (default 120)")
    p.add_argument("--token-file", type=Path, help=f"file holding the bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--tls-ca", type=Path, help="CA bundle (PEM) to verify the server; enables TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client key (PEM), for mutual TLS")
    p.add_argument("--tls-server-name", help="expected name in the server certificate")
    return p


def _sampling_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-new-tokens", type=int, help="upper bound on generated tokens (server default)")
    p.add_argument("--temperature", type=float, help="0 is greedy (the server default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 disables)")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return p


def _client(args: argparse.Namespace, env: Mapping[str, str]) -> SluiceClient:
    token = env.get(TOKEN_ENV)
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return SluiceClient(args.target, token=token, tls=tls, timeout=args.timeout)


def _request(
    args: argparse.Namespace, *, prompt: str | None = None, messages: Sequence[tuple[str, str]] | None = None
) -> generation_pb2.GenerateRequest:
    return build_generate_request(
        prompt,
        messages=messages,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )


def _read_arg(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def _stream(
    client: SluiceClient, request: generation_pb2.GenerateRequest, out: TextIO
) -> tuple[str, generation_pb2.Final]:
    """Print the chunks as they arrive; return the whole text and the final message."""
    parts: list[str] = []
    for response in client.generate(request):
        if response.WhichOneof("event") == "final":
            return "".join(parts), response.final
        parts.append(response.chunk.text)
        out.write(response.chunk.text)
        out.flush()
    raise RuntimeError("the stream ended without a final message")


def _describe_end(final: generation_pb2.Final) -> str | None:
    """A note for stderr when the answer did not end naturally; None when it did."""
    reason = final.finish_reason
    if reason == generation_pb2.FINISH_REASON_CONTENT_FILTER:
        verdict = final.output_verdict if final.HasField("output_verdict") else final.input_verdict
        if final.HasField("input_verdict") and not final.input_verdict.safe:
            verdict = final.input_verdict
        return f"[blocked by the guard: {','.join(verdict.categories) or 'unsafe'}]"
    if reason == generation_pb2.FINISH_REASON_LENGTH:
        return "[stopped: token limit reached]"
    return None


def _chat(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Interactive chat: each line is a user turn; /reset clears the conversation, /exit or EOF ends."""
    history: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    print("sluice chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    with _client(args, env) as client:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                del history[1 if args.system else 0 :]
                continue
            if not line.strip():
                continue
            turn = [*history, ("user", line)]
            try:
                answer, final = _stream(client, _request(args, messages=turn), sys.stdout)
            except KeyboardInterrupt:  # cancels this answer only; the conversation goes on without it
                print("\n[cancelled]", file=sys.stderr)
                continue
            print()
            note = _describe_end(final)
            if note:
                print(note, file=sys.stderr)
            if final.finish_reason != generation_pb2.FINISH_REASON_CONTENT_FILTER:
                history = [*turn, ("assistant", answer)]


def _generate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    prompt = _read_arg(args.prompt)
    messages = [("user", prompt)] if args.chat else None
    request = _request(args, prompt=None if args.chat else prompt, messages=messages)
    with _client(args, env) as client:
        if args.json:
            print_json(client.complete(as_complete_request(request)), sys.stdout)
            return 0
        _, final = _stream(client, request, sys.stdout)
    print()
    note = _describe_end(final)
    if note:
        print(note, file=sys.stderr)
    return 0


def _tokenize(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    text = _read_arg(args.text)
    request = generation_pb2.TokenizeRequest()
    if args.chat:
        request.messages.messages.add(role=common_pb2.CHAT_ROLE_USER, content=text)
    else:
        request.prompt = text
    with _client(args, env) as client:
        response = client.tokenize(request)
    if args.json:
        print_json(response, sys.stdout)
    else:
        print(" ".join(str(i) for i in response.token_ids))
        print(f"{response.token_count} tokens", file=sys.stderr)
    return 0


def _moderate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    roles = (common_pb2.CHAT_ROLE_USER, common_pb2.CHAT_ROLE_ASSISTANT)
    request = moderation_pb2.ModerateRequest()
    for i, text in enumerate(args.turns):
        request.messages.add(role=roles[i % 2], content=_read_arg(text))
    if args.role:
        request.role = moderation_pb2.ModerationRole.Value(f"MODERATION_ROLE_{args.role.upper()}")
    with _client(args, env) as client:
        response = client.moderate(request)
    if args.json:
        print_json(response, sys.stdout)
        return 0
    v = response.verdict
    label = "safe" if v.safe else f"unsafe {','.join(v.categories)}".rstrip()
    print(f"{label} (score {v.score:.2f}, {v.backend or 'guard'}, {v.latency_seconds * 1000:.0f} ms)")
    return 0


def _info(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    with _client(args, env) as client:
        print_json(client.model_info(), sys.stdout)
    return 0


def print_json(message: Message, out: TextIO) -> None:
    """Print a proto message as JSON with the .proto field names.

    Args:
        message: the message.
        out: the stream.
    """
    print(json_format.MessageToJson(message, preserving_proto_field_name=True), file=out)


if __name__ == "__main__":
    sys.exit(main())
