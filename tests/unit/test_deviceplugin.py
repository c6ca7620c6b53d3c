"""hack/deviceplugin.py, the real test node's fake GPU plugin: its hand-written protobuf messages and the
gRPC conversation with a stand-in kubelet (Register, then ListAndWatch and Allocate on the plugin's socket).
The real kubelet talks to it in tests/node."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("deviceplugin", ROOT / "hack" / "deviceplugin.py")
assert spec and spec.loader
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)


def test_varints_and_fields_round_trip() -> None:
    for n in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        msg = dp._varint(8) + dp._varint(n)  # field 1, varint
        assert dp.parse(msg) == {1: [n]}
    msg = dp.field_str(2, "héllo") + dp.field_bool(3, True) + dp.field_bool(4, False) + dp.field_str(2, "x" * 300)
    assert dp.parse(msg) == {2: ["héllo".encode(), b"x" * 300], 3: [1]}


def test_allocate_request_and_response_shapes() -> None:
    # AllocateRequest{container_requests: [{devices_ids: [a, b]}, {devices_ids: [c]}]}
    req = dp.field_bytes(1, dp.field_str(1, "a") + dp.field_str(1, "b")) + dp.field_bytes(1, dp.field_str(1, "c"))
    assert dp.allocate_ids(req) == [["a", "b"], ["c"]]
    # a varint where a device id belongs is malformed, not five zero bytes
    bad = dp.field_bytes(1, dp._varint(8) + dp._varint(5))
    with pytest.raises(ValueError, match="devices_ids"):
        dp.allocate_ids(bad)
    resp = dp.parse(dp.allocate_response([["a", "b"], ["c"]]))
    envs = []
    for container in resp[1]:
        entry = dp.parse(dp.parse(container)[1][0])  # envs map entry: key = 1, value = 2
        envs.append((entry[1][0], entry[2][0]))
    assert envs == [(b"NVIDIA_VISIBLE_DEVICES", b"a,b"), (b"NVIDIA_VISIBLE_DEVICES", b"c")]


def test_registers_advertises_and_allocates_over_grpc() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # unix socket paths must stay short
        registered: list[dict] = []

        def register(req: bytes, _ctx) -> bytes:
            f = dp.parse(req)
            registered.append({"version": f[1][0], "endpoint": f[2][0], "resource": f[3][0]})
            return b""

        kubelet = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kubelet.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "v1beta1.Registration", {"Register": grpc.unary_unary_rpc_method_handler(register)}),))
        kubelet.add_insecure_port(f"unix://{d}/kubelet.sock")
        kubelet.start()
        plugin = dp.Plugin(d, "nvidia.com/gpu", 3, "GPU-t-")
        t = threading.Thread(target=plugin.run, daemon=True)
        t.start()
        try:
            for _ in range(100):
                if registered:
                    break
                threading.Event().wait(0.05)
            assert registered == [{"version": b"v1beta1", "endpoint": b"pbt-nvidia.com-gpu.sock",
                                   "resource": b"nvidia.com/gpu"}]
            with grpc.insecure_channel(f"unix://{os.path.join(d, 'pbt-nvidia.com-gpu.sock')}") as ch:
                stream = ch.unary_stream("/v1beta1.DevicePlugin/ListAndWatch")(b"", timeout=5)
                devices = [dp.parse(x) for x in dp.parse(next(stream))[1]]
                assert [(x[1][0], x[2][0]) for x in devices] == [(b"GPU-t-0", b"Healthy"), (b"GPU-t-1", b"Healthy"),
                                                                 (b"GPU-t-2", b"Healthy")]
                stream.cancel()
                req = dp.field_bytes(1, dp.field_str(1, "GPU-t-2") + dp.field_str(1, "GPU-t-0"))
                resp = ch.unary_unary("/v1beta1.DevicePlugin/Allocate")(req, timeout=5)
                entry = dp.parse(dp.parse(dp.parse(resp)[1][0])[1][0])
                assert entry == {1: [b"NVIDIA_VISIBLE_DEVICES"], 2: [b"GPU-t-2,GPU-t-0"]}
        finally:
            plugin.stop.set()
            t.join(10)
            plugin.shutdown()
            kubelet.stop(None)
