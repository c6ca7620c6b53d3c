#!/usr/bin/env python3
"""A fake GPU device plugin for the real test node (hack/realnode.sh): the kubelet's device-plugin API
v1beta1 over unix sockets, advertising N healthy ``nvidia.com/gpu`` devices.

Allocate answers the way NVIDIA's plugin does for the environment-variable strategy: the allocated device
ids, comma-separated, in ``NVIDIA_VISIBLE_DEVICES``. The kubelet does the accounting, so a pod asking for
more devices than are free stays Pending (Insufficient nvidia.com/gpu), exactly as on a GPU node.

The protobuf messages are few and flat, so they are encoded and decoded here by hand (field numbers from
the published v1beta1 api.proto) and only grpcio is needed, with raw-bytes method handlers.

The kubelet deletes every socket in its device-plugins directory when it (re)starts; the plugin notices its
socket is gone and serves and registers again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

API_VERSION = "v1beta1"
log = logging.getLogger("deviceplugin")


# ---- protobuf wire format (varint and length-delimited fields only) -------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def field_str(num: int, s: str) -> bytes:
    return field_bytes(num, s.encode())


def field_bool(num: int, v: bool) -> bytes:
    return _varint(num << 3) + _varint(1) if v else b""


def parse(data: bytes) -> dict[int, list[bytes | int]]:
    """Fields of one message: number -> values (bytes for length-delimited, int for varints)."""
    out: dict[int, list[bytes | int]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < len(data):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            out.setdefault(num, []).append(varint())
        elif wire == 2:
            n = varint()
            out.setdefault(num, []).append(data[i:i + n])
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


# ---- messages ------------------------------------------------------------------------------------------
def device_plugin_options() -> bytes:
    # pre_start_required = 1, get_preferred_allocation_available = 2: neither is needed
    return b""


def register_request(endpoint: str, resource: str) -> bytes:
    return (field_str(1, API_VERSION) + field_str(2, endpoint) + field_str(3, resource)
            + field_bytes(4, device_plugin_options()))


def list_and_watch_response(ids: list[str]) -> bytes:
    # Device: ID = 1, health = 2
    return b"".join(field_bytes(1, field_str(1, d) + field_str(2, "Healthy")) for d in ids)


def _embedded(value: bytes | int, field: str) -> bytes:
    """A length-delimited field's bytes; a varint where a message or string belongs is a malformed request
    (bytes(n) of an int would silently be n zero bytes)."""
    if isinstance(value, int):
        raise ValueError(f"{field}: expected a length-delimited field, got the varint {value}")
    return value


def allocate_ids(request: bytes) -> list[list[str]]:
    """AllocateRequest.container_requests (1) -> ContainerAllocateRequest.devices_ids (1) per container."""
    reqs = parse(request).get(1, [])
    return [[_embedded(v, "devices_ids").decode() for v in parse(_embedded(r, "container_requests")).get(1, [])]
            for r in reqs]


def allocate_response(per_container: list[list[str]]) -> bytes:
    # ContainerAllocateResponse.envs = 1 (map<string, string>: entries with key = 1, value = 2)
    out = b""
    for ids in per_container:
        env = field_bytes(1, field_str(1, "NVIDIA_VISIBLE_DEVICES") + field_str(2, ",".join(ids)))
        out += field_bytes(1, env)
    return out


# ---- the plugin ----------------------------------------------------------------------------------------
class Plugin:
    def __init__(self, plugin_dir: str, resource: str, count: int, prefix: str):
        self.plugin_dir = plugin_dir
        self.resource = resource
        self.ids = [f"{prefix}{i}" for i in range(count)]
        self.endpoint = f"pbt-{resource.replace('/', '-')}.sock"
        self.socket = os.path.join(plugin_dir, self.endpoint)
        self.stop = threading.Event()
        self.server: grpc.Server | None = None

    # handlers take and return raw message bytes
    def get_options(self, _req: bytes, _ctx: grpc.ServicerContext) -> bytes:
        return device_plugin_options()

    def list_and_watch(self, _req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        log.info("ListAndWatch: advertising %s", self.ids)
        yield list_and_watch_response(self.ids)
        while not self.stop.is_set() and ctx.is_active():
            self.stop.wait(1.0)

    def allocate(self, req: bytes, _ctx: grpc.ServicerContext) -> bytes:
        per_container = allocate_ids(req)
        log.info("Allocate: %s", per_container)
        return allocate_response(per_container)

    def pre_start(self, _req: bytes, _ctx: grpc.ServicerContext) -> bytes:
        return b""

    def preferred(self, _req: bytes, _ctx: grpc.ServicerContext) -> bytes:
        return b""

    def serve(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        h = grpc
        server.add_generic_rpc_handlers((h.method_handlers_generic_handler(f"{API_VERSION}.DevicePlugin", {
            "GetDevicePluginOptions": h.unary_unary_rpc_method_handler(self.get_options),
            "ListAndWatch": h.unary_stream_rpc_method_handler(self.list_and_watch),
            "Allocate": h.unary_unary_rpc_method_handler(self.allocate),
            "PreStartContainer": h.unary_unary_rpc_method_handler(self.pre_start),
            "GetPreferredAllocation": h.unary_unary_rpc_method_handler(self.preferred),
        }),))
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self.server = server

    def register(self) -> None:
        kubelet = os.path.join(self.plugin_dir, "kubelet.sock")
        with grpc.insecure_channel(f"unix://{kubelet}") as ch:
            call = ch.unary_unary(f"/{API_VERSION}.Registration/Register")
            call(register_request(self.endpoint, self.resource), timeout=10)
        log.info("registered %s (%d devices) with the kubelet at %s", self.resource, len(self.ids), kubelet)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.serve()
                self.register()
            except Exception as exc:  # the kubelet may be restarting: try again shortly
                log.warning("serve/register failed: %s", exc)
                self.shutdown()
                self.stop.wait(1.0)
                continue
            # the kubelet removes our socket when it restarts: then serve and register again
            while not self.stop.is_set() and os.path.exists(self.socket):
                self.stop.wait(1.0)
            self.shutdown()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plugin-dir", default="/var/lib/kubelet/device-plugins")
    ap.add_argument("--resource", default="nvidia.com/gpu")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--id-prefix", default="GPU-pbt-", help="device ids: <prefix>0, <prefix>1, ...")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    plugin = Plugin(args.plugin_dir, args.resource, args.devices, args.id_prefix)
    signal.signal(signal.SIGTERM, lambda *_: plugin.stop.set())
    signal.signal(signal.SIGINT, lambda *_: plugin.stop.set())
    plugin.run()
    plugin.shutdown()
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
