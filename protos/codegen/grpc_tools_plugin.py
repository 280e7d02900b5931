"""A protoc plugin that runs one of grpc_tools' built-in generators, for buf.gen.yaml.

buf runs protoc's own generators (python, pyi) through a protoc binary, which
grpcio-tools provides as ``python -m grpc_tools.protoc``; but the gRPC stub
generator lives inside that same compiler, not in a ``protoc-gen-grpc_python``
executable, and buf only proxies the generators protoc itself ships. This
adapter speaks the plugin protocol to buf and hands the request to grpc_tools'
compiler, so ``buf generate`` stays the one code-generation path, offline, with
the grpcio-tools version that pyproject.toml pins (which matches the grpcio
runtime the generated stubs check).

Usage in buf.gen.yaml: ``local: [python, protos/codegen/grpc_tools_plugin.py, grpc_python]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def generate(
    request: plugin_pb2.CodeGeneratorRequest, generator: str
) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse()
    response.supported_features = plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "request.binpb"
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out = Path(tmp) / "out"
        out.mkdir()
        argv = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={descriptors}",
            f"--{generator}_out={out}",
        ]
        if request.parameter:
            argv.append(f"--{generator}_opt={request.parameter}")
        if protoc.main([*argv, *request.file_to_generate]) != 0:
            response.error = f"grpc_tools.protoc --{generator}_out failed (see stderr)"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    return response


def main() -> None:
    (generator,) = sys.argv[1:]
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request, generator).SerializeToString())


if __name__ == "__main__":
    main()
