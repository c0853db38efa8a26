#!/usr/bin/env python3
"""Stream an answer from an afnext server (`afnext serve`, or the cluster's router) with grpcio.

    pip install grpcio grpcio-tools
    python examples/python/afnext_client.py --server 127.0.0.1:50051 \
        --audio tests/fixtures/audio/speech_7s.flac --prompt "Transcribe the audio."

The stubs are generated from proto/afnext/v1/afnext.proto at start (grpcio-tools, into a temporary
directory), so the client always matches the proto of this checkout. Files above --upload-above-mib are sent
with the UploadAudio RPC in chunks and referenced by id; smaller ones travel inline.
"""

import argparse
import json
import os
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))


def load_stubs():
    from grpc_tools import protoc
    import importlib.resources

    out = tempfile.mkdtemp(prefix="afnext-stubs-")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["protoc", "-I", PROTO_ROOT, "-I", include, "--python_out", out,
                      "--grpc_python_out", out, "afnext/v1/afnext.proto"])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from afnext.v1 import afnext_pb2, afnext_pb2_grpc  # noqa: E402
    return afnext_pb2, afnext_pb2_grpc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--audio", help="audio file (wav, flac, mp3, ogg/vorbis)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--system")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--timeout-s", type=float, help="deadline of the call")
    ap.add_argument("--upload-above-mib", type=float, default=32.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    args = ap.parse_args()

    pb, rpc = load_stubs()
    channel = grpc.insecure_channel(args.server, options=[
        ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
    stub = rpc.AfNextStub(channel)

    messages = []
    if args.system:
        messages.append(pb.Message(role=pb.ROLE_SYSTEM, parts=[pb.Part(text=args.system)]))
    parts = []
    if args.audio:
        data = open(args.audio, "rb").read()
        if len(data) > args.upload_above_mib * (1 << 20):
            chunks = (pb.UploadAudioRequest(chunk=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
            up = stub.UploadAudio(chunks)
            parts.append(pb.Part(audio=pb.AudioPart(upload_id=up.upload_id)))
        else:
            parts.append(pb.Part(audio=pb.AudioPart(data=data)))
    parts.append(pb.Part(text=args.prompt))
    messages.append(pb.Message(role=pb.ROLE_USER, parts=parts))
    req = pb.GenerateRequest(messages=messages, stop=args.stop,
                             sampling=pb.SamplingParams(temperature=args.temperature, seed=args.seed))
    if args.max_new_tokens is not None:
        req.max_new_tokens = args.max_new_tokens

    text, ids, result = [], [], {}
    try:
        for ev in stub.Generate(req, timeout=args.timeout_s):
            kind = ev.WhichOneof("event")
            if kind == "progress" and not args.json:
                print(f"[encoded {ev.progress.windows_done}/{ev.progress.windows_total} windows]", file=sys.stderr)
            elif kind == "delta":
                text.append(ev.delta.text)
                ids.extend(ev.delta.token_ids)
                if not args.json:
                    print(ev.delta.text, end="", flush=True)
            elif kind == "finished":
                f = ev.finished
                result = {
                    "finish_reason": pb.FinishReason.Name(f.reason),
                    "usage": {k: getattr(f.usage, k) for k in (
                        "prompt_tokens", "audio_tokens", "cached_tokens", "completion_tokens",
                        "audio_seconds", "audio_cache_hits")},
                    "timings_ms": {k: getattr(f.timings, k) for k in (
                        "prepare_ms", "encode_ms", "queue_ms", "prefill_ms", "time_to_first_token_ms", "total_ms")},
                }
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": ids, **result}))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
