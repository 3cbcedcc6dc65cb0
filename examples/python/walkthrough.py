#!/usr/bin/env python3
"""The README's worked example in Python, with stock grpcio.

Against a server started with `cargo run --release -- serve --dev`, encrypt a US user
profile as the US signup service, then ask for it as three different people, over
mutual TLS with the development PKI and development employee tokens. The gRPC stubs
are generated at run time from proto/ with grpcio-tools: nothing Rust is imported.

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    .venv/bin/python examples/python/walkthrough.py [--address 127.0.0.1:50051]

Employee tokens come from `ringfence dev token` (run as `cargo run --release --quiet --`
unless --ringfence names the binary). With --check the script exits 1 when an answer
differs from what the shipped policies decide.
"""

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import grpc
    from grpc_tools import protoc
except ImportError as missing:
    sys.exit(
        f"error: {missing.name} is not installed: "
        "pip install -r examples/python/requirements.txt (in a venv)"
    )

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The record of the walkthrough, field by field.
FIELDS = [
    ("display_name", b"Ada L."),
    ("email", b"ada@example.com"),
    ("last_login_ip", b"203.0.113.7"),
    ("government_id", b"123-45-6789"),
]

# Who asks, through which service, with which purpose and ticket; and what the shipped
# policies answer, per field: "plaintext", or "denied" with the policy ids shown.
ASKS = [
    (
        "alice",
        "us-support-tool",
        "support",
        "INC-1234",
        {
            "display_name": ("plaintext",),
            "email": ("plaintext",),
            "last_login_ip": ("plaintext",),
            "government_id": ("denied",),
        },
    ),
    (
        "alice",
        "us-support-tool",
        "",
        "",
        {
            "display_name": ("plaintext",),
            "email": ("denied",),
            "last_login_ip": ("denied",),
            "government_id": ("denied",),
        },
    ),
    (
        "bob",
        "us-support-tool",
        "support",
        "INC-1234",
        {
            name: ("denied", "parent-company-never-reads-us")
            for name, _ in FIELDS
        },
    ),
]


def generate_stubs(proto_dir: Path, out_dir: Path):
    """Compiles ringfence/v1/ringfence.proto into out_dir and imports it."""
    arguments = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "ringfence/v1/ringfence.proto",
    ]
    if protoc.main(arguments) != 0:
        sys.exit(f"error: grpc_tools.protoc could not compile {proto_dir}/ringfence/v1/ringfence.proto")
    sys.path.insert(0, str(out_dir))
    pb = importlib.import_module("ringfence.v1.ringfence_pb2")
    rpc = importlib.import_module("ringfence.v1.ringfence_pb2_grpc")
    return pb, rpc


class Dev:
    """The development PKI that `serve --dev` creates in the data directory."""

    def __init__(self, data_dir: Path, ringfence: list, policies, server_name: str):
        self.pki = data_dir / "dev-pki"
        self.data_dir = data_dir
        self.ringfence = ringfence
        self.policies = policies
        self.server_name = server_name

    def read(self, relative: str) -> bytes:
        path = self.pki / relative
        try:
            return path.read_bytes()
        except OSError as error:
            sys.exit(f"error: {path}: {error.strerror} (`serve --dev` or `ringfence dev init` creates it)")

    def channel(self, address: str, service=None):
        """A channel authenticated as `service` by its client certificate (None: no certificate)."""
        if service is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.read("ca.pem"))
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.read("ca.pem"),
                private_key=self.read(f"clients/{service}-key.pem"),
                certificate_chain=self.read(f"clients/{service}.pem"),
            )
        # The development server certificate names localhost, whatever the address.
        return grpc.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", self.server_name)]
        )

    def token(self, employee: str, service: str) -> str:
        """A development token for `employee`, usable only by `service`."""
        command = self.ringfence + [
            "dev", "token", "--data-dir", str(self.data_dir),
            "--employee", employee, "--service", service, "--ttl-minutes", "5",
        ]
        if self.policies is not None:
            command += ["--policies", str(self.policies)]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            sys.exit(f"error: cannot run `{command[0]}` for `dev token` ({error.strerror}): name ringfence with --ringfence")
        if done.returncode != 0:
            sys.exit(f"error: `{shlex.join(command)}` failed: {done.stderr.strip()}")
        return done.stdout.strip()


def shown(field) -> tuple:
    """(text for the table, (outcome, policy ids...)) of one FieldOutcome."""
    kind = field.WhichOneof("outcome")
    if kind == "plaintext":
        return f"plaintext {field.plaintext.decode('utf-8', 'replace')!r}", ("plaintext",)
    if kind == "denied":
        ids = list(field.denied.policy_ids)
        if ids:
            return f"denied: {field.denied.reason} ({', '.join(ids)})", ("denied", *ids)
        return f"denied: {field.denied.reason}", ("denied",)
    if kind == "error":
        return f"error: {field.error.message}", ("error",)
    return "no outcome", ("none",)


def explain(error: grpc.RpcError, what: str, address: str) -> str:
    text = f"{what}: {error.code().name}: {error.details()}"
    if error.code() == grpc.StatusCode.UNAVAILABLE and "Connection refused" in (error.details() or ""):
        text += f"\n  Nothing listens on {address}: start the server (`cargo run --release -- serve --dev`) or pass --address."
    elif error.code() == grpc.StatusCode.UNAVAILABLE:
        # A refused TLS handshake reaches grpcio only as UNAVAILABLE (often
        # "TSI_DATA_CORRUPTED" or "Socket closed"); the server knows why.
        text += (
            "\n  If the server is up, it may have refused the TLS handshake: its log and the"
            "\n  decision log say why (`ringfence audit query --kind unauthenticated`)."
        )
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--server-name", default="localhost", help="the name the server certificate carries")
    parser.add_argument("--data-dir", type=Path, default=Path("ringfence-data"))
    parser.add_argument("--policies", type=Path, help="policy directory for `dev token` (default: its own)")
    parser.add_argument("--proto", type=Path, default=REPO / "proto", help="directory holding ringfence/v1/ringfence.proto")
    parser.add_argument(
        "--ringfence",
        default=os.environ.get("RINGFENCE", "cargo run --release --quiet --"),
        help="command that runs ringfence, for `dev token` (default: $RINGFENCE, else cargo run)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless every answer is the expected one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ringfence-stubs-") as stubs:
        pb, rpc = generate_stubs(args.proto, Path(stubs))
        dev = Dev(args.data_dir, shlex.split(args.ringfence), args.policies, args.server_name)
        wrong = []
        # Tokens first: a missing tool fails before anything is encrypted.
        tokens = {(who, service): dev.token(who, service) for who, service, *_ in ASKS}

        with dev.channel(args.address, "us-signup") as channel:
            client = rpc.RingfenceStub(channel)
            request = pb.EncryptRecordRequest(
                record_type="user_profile",
                record_id="user-1001",
                jurisdiction="US",
                fields=[pb.PlainField(name=name, value=value) for name, value in FIELDS],
            )
            try:
                encrypted = client.EncryptRecord(request, timeout=10)
            except grpc.RpcError as error:
                print(explain(error, "EncryptRecord as us-signup", args.address), file=sys.stderr)
                return 1
        record = encrypted.record
        print(f"encrypted user-1001 (request {encrypted.request_id}):")
        for field in record.fields:
            print(f"  {field.name:<14} {len(field.ciphertext)} bytes, starts {field.ciphertext[:12].hex()}")

        for who, service, purpose, ticket, expected in ASKS:
            token = tokens[(who, service)]
            with dev.channel(args.address, service) as channel:
                client = rpc.RingfenceStub(channel)
                request = pb.DecryptRecordRequest(record=record, purpose=purpose, ticket=ticket)
                try:
                    answer = client.DecryptRecord(
                        request, timeout=10, metadata=[("authorization", f"Bearer {token}")]
                    )
                except grpc.RpcError as error:
                    print(explain(error, f"DecryptRecord as {who} via {service}", args.address), file=sys.stderr)
                    return 1
            print(f"\n{who} via {service}, purpose {purpose!r}, ticket {ticket!r} (request {answer.request_id}):")
            got = {}
            for field in answer.fields:
                text, outcome = shown(field)
                got[field.name] = (outcome, field)
                print(f"  {field.name:<14} {text}")
            for name, value in FIELDS:
                outcome, field = got.get(name, (("missing",), None))
                if outcome != expected[name]:
                    wrong.append(f"{who} {purpose!r} {name}: {outcome}, expected {expected[name]}")
                elif outcome == ("plaintext",) and field.plaintext != value:
                    wrong.append(f"{who} {purpose!r} {name}: plaintext differs from what was encrypted")

        # What a refused TLS handshake looks like to a client: a service without a
        # client certificate.
        print("\na caller without a client certificate:")
        with dev.channel(args.address) as channel:
            try:
                rpc.RingfenceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
                wrong.append("a caller without a client certificate was answered")
                print("  answered (it should not be)")
            except grpc.RpcError as error:
                print("  " + explain(error, "GetStatus", args.address).replace("\n", "\n  "))
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    wrong.append(f"no certificate: {error.code().name}, expected UNAVAILABLE")

    print(f"\nEvery request above is in {args.data_dir}/log/; check it with `ringfence audit verify`.")
    if args.check and wrong:
        print("\nunexpected answers:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
