"""A real grpcio (grpc C-core) client for ferry's Workload API and SDS, with default
channel options, so C-core's percent-encoded `:authority` for Unix sockets is what goes on
the wire. Stubs are generated at run time from workload.proto with grpcio-tools.

usage: grpcio_client.py TARGET PROTO_DIR OUT_DIR SDS_REQUEST_HEX [probe]

Prints one JSON object: {method: {"ok": bool, ...}}. With `probe`, calls only
FetchJWTSVID (used against a server without the shim, to show the failure).
"""

import binascii
import importlib.resources
import json
import os
import sys

import grpc
from grpc_tools import protoc

HEADER = (("workload.spiffe.io", "true"),)
TIMEOUT = 20
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"


def stubs(proto_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    wkt = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            "-I" + proto_dir,
            "-I" + wkt,
            "--python_out=" + out_dir,
            "--grpc_python_out=" + out_dir,
            os.path.join(proto_dir, "workload.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit("protoc failed: %d" % rc)
    sys.path.insert(0, out_dir)
    import workload_pb2  # noqa: E402
    import workload_pb2_grpc  # noqa: E402

    return workload_pb2, workload_pb2_grpc


def call(results, name, fn):
    try:
        results[name] = dict(ok=True, **fn())
    except grpc.RpcError as e:
        results[name] = dict(ok=False, code=e.code().name, details=e.details() or "")


def main():
    target, proto_dir, out_dir, sds_hex = sys.argv[1:5]
    probe = len(sys.argv) > 5 and sys.argv[5] == "probe"
    pb, pb_grpc = stubs(proto_dir, out_dir)
    channel = grpc.insecure_channel(target)
    api = pb_grpc.SpiffeWorkloadAPIStub(channel)
    results = {}

    def jwt():
        r = api.FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["ferry-test"]), metadata=HEADER, timeout=TIMEOUT
        )
        results["_token"] = r.svids[0].svid
        return {"spiffe_id": r.svids[0].spiffe_id}

    if probe:
        call(results, "FetchJWTSVID", jwt)
        results.pop("_token", None)
        print(json.dumps(results))
        return

    def first(stream):
        for msg in stream:
            stream.cancel()
            return msg
        raise RuntimeError("stream ended without a message")

    call(
        results,
        "FetchX509SVID",
        lambda: {
            "spiffe_ids": [
                s.spiffe_id
                for s in first(
                    api.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT)
                ).svids
            ]
        },
    )
    call(
        results,
        "FetchX509Bundles",
        lambda: {
            "trust_domains": sorted(
                first(
                    api.FetchX509Bundles(
                        pb.X509BundlesRequest(), metadata=HEADER, timeout=TIMEOUT
                    )
                ).bundles.keys()
            )
        },
    )
    call(results, "FetchJWTSVID", jwt)
    call(
        results,
        "FetchJWTBundles",
        lambda: {
            "trust_domains": sorted(
                first(
                    api.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=HEADER, timeout=TIMEOUT)
                ).bundles.keys()
            )
        },
    )
    token = results.pop("_token", "")
    call(
        results,
        "ValidateJWTSVID",
        lambda: {
            "spiffe_id": api.ValidateJWTSVID(
                pb.ValidateJWTSVIDRequest(audience="ferry-test", svid=token),
                metadata=HEADER,
                timeout=TIMEOUT,
            ).spiffe_id
        },
    )
    # The security header is still enforced through the shim.
    call(
        results,
        "FetchJWTSVID_without_header",
        lambda: {
            "spiffe_id": api.FetchJWTSVID(
                pb.JWTSVIDRequest(audience=["x"]), timeout=TIMEOUT
            ).svids[0].spiffe_id
        },
    )

    # SDS with raw bytes: the Rust test built the DiscoveryRequest and decodes the answers.
    req = binascii.unhexlify(sds_hex)
    raw = dict(request_serializer=None, response_deserializer=None)
    fetch = channel.unary_unary(SDS + "FetchSecrets", **raw)
    call(results, "FetchSecrets", lambda: {"response": fetch(req, timeout=TIMEOUT).hex()})
    stream = channel.stream_stream(SDS + "StreamSecrets", **raw)
    call(
        results,
        "StreamSecrets",
        lambda: {"response": first(stream(iter([req]), timeout=TIMEOUT)).hex()},
    )
    delta = channel.stream_stream(SDS + "DeltaSecrets", **raw)
    call(
        results,
        "DeltaSecrets",
        lambda: {"response": first(delta(iter([b""]), timeout=TIMEOUT)).hex()},
    )
    channel.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
