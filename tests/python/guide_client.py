"""The Python client of the user's configuration guide, run against llumlet-rs.

Generates the gRPC stubs from the project's proto/ with grpcio-tools into a scratch directory,
laid out so that the guide's imports work unchanged, then runs one of:

  migrate HOST PORT       the guide's `trigger_manual_migration()`, verbatim but for the address
  decode-metadata FILE    parse CMS metadata bytes with the generated cms_pb2, print JSON
  decode-status FILE      parse CMS status bytes with the generated cms_pb2, print JSON
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")


def generate(out):
    from grpc_tools import protoc

    rc = protoc.main([
        "protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}",
        os.path.join(PROTO, "cms.proto"), os.path.join(PROTO, "llumlet_server.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"grpc_tools.protoc failed with {rc}")
    pkg = os.path.join(out, "llumnix", "llumlet", "proto")
    os.makedirs(pkg)
    open(os.path.join(out, "llumnix", "__init__.py"), "w").close()
    open(os.path.join(out, "llumnix", "llumlet", "__init__.py"), "w").close()
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("import llumlet_server_pb2, llumlet_server_pb2_grpc, cms_pb2\n")
    # The two enums the guide imports from llumnix.utils (upstream: str-valued enums).
    with open(os.path.join(out, "llumnix", "utils.py"), "w") as f:
        f.write(
            "from enum import Enum\n"
            "class MigrationType(str, Enum):\n"
            "    NUM_REQ = 'NUM_REQ'\n    TOKEN = 'TOKEN'\n    RATIO = 'RATIO'\n"
            "class RequestMigrationPolicy(str, Enum):\n"
            "    LCR = 'LCR'\n    SR = 'SR'\n    LR = 'LR'\n    FCW = 'FCW'\n    FCWSR = 'FCWSR'\n    FCR = 'FCR'\n"
        )
    sys.path.insert(0, out)


def migrate(llumlet_host, llumlet_port, src="engine_01", dst="engine_02", dst_ip="10.0.0.2", dst_port=29876):
    # --- from the user's guide ---
    import asyncio
    import grpc
    from llumnix.llumlet.proto import llumlet_server_pb2_grpc, llumlet_server_pb2
    from llumnix.utils import MigrationType, RequestMigrationPolicy

    async def trigger_manual_migration():
        # 1. Connect to the Source Llumlet
        address = f"{llumlet_host}:{llumlet_port}"
        channel = grpc.aio.insecure_channel(address)
        stub = llumlet_server_pb2_grpc.LlumletStub(channel)

        # 2. Construct the Migration Request
        request = llumlet_server_pb2.MigrateRequest(
            src_engine_id=src,  # the guide: "engine_01"
            dst_engine_id=dst,  # the guide: "engine_02"
            dst_engine_ip=dst_ip,  # Destination IP (the guide: "10.0.0.2")
            dst_engine_port=dst_port,  # Destination KV Transfer Port (the guide: 29876)
            migration_req_policy=RequestMigrationPolicy.SR,
            migration_type=MigrationType.NUM_REQ,
            num_reqs=1,  # Migrate 1 active request
            trigger_policy="NEUTRAL_LOAD"
        )

        # 3. Execute
        try:
            response = await stub.Migrate(request)
            print(f"Success: {response.success}, Message: {response.message}")
        except grpc.aio.AioRpcError as e:
            print(f"RPC Failed: {e.code()} - {e.details()}")

    asyncio.run(trigger_manual_migration())
    # --- end of the guide's code ---


def decode(kind, path):
    import cms_pb2
    from google.protobuf.json_format import MessageToJson

    msg = cms_pb2.InstanceMetadata() if kind == "metadata" else cms_pb2.InstanceStatus()
    with open(path, "rb") as f:
        msg.ParseFromString(f.read())
    print(MessageToJson(msg, preserving_proto_field_name=True, indent=None))


def main():
    with tempfile.TemporaryDirectory() as out:
        generate(out)
        cmd = sys.argv[1]
        if cmd == "migrate":
            # Optional: src, dst, dst_ip, dst_port (the guide's values otherwise).
            extra = sys.argv[4:8]
            if len(extra) == 4:
                extra[3] = int(extra[3])
            migrate(sys.argv[2], int(sys.argv[3]), *extra)
        elif cmd in ("decode-metadata", "decode-status"):
            decode(cmd.split("-")[1], sys.argv[2])
        else:
            raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
