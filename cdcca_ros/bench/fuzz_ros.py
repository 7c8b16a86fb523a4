"""Hostile ROS messages for every input of every node, and the run against the demo graph.

:data:`INPUTS` names each input (``<node>/<topic, service or parameters>``); each has a
generator ``make(rng) -> message or request`` of malformed or hostile values: wrong sizes and
encodings, NaN/Inf, huge strings and lists, wrong device ids, out-of-order and inconsistent
chunks, forged signatures, parameters the node's table refuses. Floods come from sending a
batch as fast as the publisher takes it. :func:`fuzz_ros_inputs` starts the demo graph as
processes (:class:`cdcca_ros.bench.graph.Graph`) and sends ``per_input`` of each from this
process, then checks what the fuzz bench reports.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdcca_ros.bench.graph import CLOUD_NS, DEVICE_NS

_WEIRD_TEXT = ['', ' ', '\x00', '٣', '\u202e' * 10, '🤖' * 50, 'robot1\x00', '../../etc/passwd',
               '%s%n', '{}' * 100, 'robot2', 'ROBOT1', 'robot1 ']


def _text(rng: np.random.Generator, huge: bool = True) -> str:
    kind = rng.integers(0, 5 if huge else 4)
    if kind == 0:
        return str(rng.choice(_WEIRD_TEXT))
    if kind == 1:
        return ''.join(chr(int(c)) for c in rng.integers(1, 0xD7FF, int(rng.integers(0, 64))))
    if kind == 2:
        return 'what color is the ' + 'very ' * int(rng.integers(0, 3000)) + 'object?'
    if kind == 3:
        return bytes(rng.integers(32, 127, int(rng.integers(0, 200)), dtype=np.uint8)).decode()
    return 'x' * int(rng.integers(10_000, 300_000))


def _u(rng: np.random.Generator, bits: int) -> int:
    edges = [0, 1, 2, 255, 256, 65535, 65536, (1 << 31) - 1, (1 << bits) - 1]
    edges = [e for e in edges if e < 1 << bits]
    # Indexing, not rng.choice: numpy would turn 2**64 - 1 into a float.
    return edges[int(rng.integers(0, len(edges)))] if rng.random() < 0.5 else int(
        rng.integers(0, 1 << min(bits, 62)))


def _float(rng: np.random.Generator) -> float:
    return float(rng.choice([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e38, 3.4e38, 1e-45,
                             float(rng.normal())]))


def hostile_image(rng: np.random.Generator) -> Any:
    """A sensor_msgs/Image that is wrong in one or more ways (or odd but valid)."""
    from sensor_msgs.msg import Image

    enc = str(rng.choice(['rgb8', 'bgr8', 'mono8', '16UC1', 'rgba8', 'yuv422', '', 'RGB8',
                          'jpeg', 'x' * 300]))
    h, w = int(rng.integers(0, 64)), int(rng.integers(0, 64))
    if rng.random() < 0.2:
        h, w = _u(rng, 32), _u(rng, 32)
    ch = {'rgb8': 3, 'bgr8': 3, 'mono8': 1, '16UC1': 2}.get(enc, 3)
    step = w * ch + int(rng.choice([0, 0, 0, 1, -1, 7]))
    step = max(0, step) & 0xFFFFFFFF
    n = step * h if step * h < 1 << 21 and rng.random() < 0.5 else int(rng.integers(0, 20_000))
    msg = Image(height=h & 0xFFFFFFFF, width=w & 0xFFFFFFFF, encoding=enc, step=step,
                is_bigendian=int(rng.choice([0, 0, 1, 2, 255])),
                data=rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    msg.header.frame_id = _text(rng, huge=False)
    msg.header.stamp.sec = int(rng.integers(0, 1 << 31))
    return msg


def hostile_question(rng: np.random.Generator) -> Any:
    from cdcca_ros.msg import Question

    n_choices = int(rng.choice([0, 0, 1, 4, 1000]))
    return Question(question_id=_text(rng, huge=False), question=_text(rng),
                    choices=[_text(rng, huge=False) for _ in range(min(n_choices, 50))]
                    + ['red'] * max(0, n_choices - 50),
                    use_image=bool(rng.random() < 0.5), image=hostile_image(rng))


def hostile_ask(rng: np.random.Generator) -> Any:
    from cdcca_ros.srv import Ask

    q = hostile_question(rng)
    return Ask.Request(question_id=q.question_id, question=q.question, choices=q.choices,
                       use_image=q.use_image, image=q.image, no_uplink=True)


def hostile_delta(rng: np.random.Generator) -> Any:
    """A DwcDelta chunk: unsigned, wrongly signed, inconsistent, for other devices, huge."""
    from cdcca_ros.msg import DwcDelta

    payload = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
    count = [1, 1, 2, 3, 7, (1 << 32) - 1][int(rng.integers(0, 6))]
    index = int(rng.integers(0, count)) if rng.random() < 0.8 else _u(rng, 32)
    chunk = payload[:max(1, len(payload) // max(1, min(count, 3)))]
    device = str(rng.choice(['robot1', 'robot1', 'robot2', '', 'robot1 ', 'x' * 300]))
    return DwcDelta(
        device_id=device, round=_u(rng, 32),
        base_version=str(rng.choice(['0', '1', ' 1', '1_0', '٣', '-1', str((1 << 64) - 1),
                                     '99999999999999999999999'])),
        base_hash=str(rng.choice(['', 'ab' * 32, _text(rng, huge=False)])),
        new_version=str(rng.choice(['1', '2', str((1 << 64) - 1), '', '1e3'])),
        new_hash='cd' * 32, codec=str(rng.choice(['sparse', 'fp16', 'nf4', 'zip', ''])),
        codec_params=_text(rng, huge=False), num_params=_u(rng, 64),
        total_size=len(payload) if rng.random() < 0.5 else _u(rng, 64),
        payload_sha256=str(rng.choice([hashlib.sha256(payload).hexdigest(), 'zz' * 32, ''])),
        chunk_index=index & 0xFFFFFFFF, chunk_count=count, chunk=chunk,
        signature=rng.integers(0, 256, int(rng.choice([0, 63, 64, 65, 1000])),
                               dtype=np.uint8).tobytes(),
        key_id=str(rng.choice(['', 'ab' * 16, 'x' * 300])), expires=_u(rng, 64),
        key_list=rng.integers(0, 256, int(rng.choice([0, 10, 5000])),
                              dtype=np.uint8).tobytes())


def hostile_tokens(rng: np.random.Generator) -> Any:
    from cdcca_ros.msg import UtsTokens

    k = int(rng.integers(0, 12))
    dtype = str(rng.choice(['fp16', 'int8', 'int4', 'ecq', 'bf16', '']))
    size = {'fp16': 2 * k * 64, 'int8': k * 64, 'int4': k * 32}.get(dtype, 200)
    size = size if rng.random() < 0.5 else int(rng.integers(0, 50_000))
    return UtsTokens(
        device_id=str(rng.choice([DEVICE_NS, DEVICE_NS, 'robot2', '', 'x' * 300])),
        sample_id=_text(rng, huge=False), model_version=_text(rng, huge=False),
        vision_space=_text(rng, huge=False), question=_text(rng), device_answer=_text(rng),
        entropy_mean=_float(rng), entropy_max=_float(rng),
        num_tokens=[10, 10, 0, 65536, (1 << 32) - 1][int(rng.integers(0, 5))],
        token_dim=[64, 64, 0, 1, (1 << 32) - 1][int(rng.integers(0, 5))],
        kept_indices=[int(i) for i in rng.integers(0, 65536 if rng.random() < 0.3 else 10, k)],
        token_variance=[_float(rng) for _ in range(k)], dtype=dtype,
        scales=[_float(rng) if rng.random() < 0.3 else 0.01
                for _ in range({'int8': k, 'int4': k, 'ecq': 1}.get(dtype, 0)
                               + int(rng.integers(0, 2)))],
        payload=rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def hostile_status(rng: np.random.Generator) -> Any:
    from cdcca_ros.msg import AdaptationStatus

    return AdaptationStatus(device_id=str(rng.choice([DEVICE_NS, 'robot2', ''])),
                            node=_text(rng, huge=False), round=_u(rng, 32),
                            state=_text(rng, huge=False), message=_text(rng),
                            model_version=_text(rng, huge=False), accuracy_before=_float(rng),
                            accuracy_after=_float(rng), apply_ms=_float(rng),
                            losses=[_float(rng) for _ in range(int(rng.integers(0, 5)))])


def hostile_rollback(rng: np.random.Generator) -> Any:
    from cdcca_ros.srv import Rollback

    return Rollback.Request()


def bad_parameter(node: str) -> Callable[[np.random.Generator], Any]:
    """SetParameters requests the node's table refuses: wrong types, out of range, NaN,
    unknown choices, unknown names."""
    def make(rng: np.random.Generator) -> Any:
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        from cdcca_ros.errors import ConfigError
        from cdcca_ros.nodes.tables import TABLES

        table = TABLES[node]
        for _ in range(50):
            spec = table[int(rng.integers(0, len(table)))]
            kind = int(rng.integers(0, 5))
            value = ParameterValue()
            if kind == 0:
                raw = _text(rng, huge=False)
                value.type, value.string_value = ParameterType.PARAMETER_STRING, raw
            elif kind == 1:
                raw = _float(rng) if rng.random() < 0.5 else float(rng.choice([-1e9, 1e12]))
                value.type, value.double_value = ParameterType.PARAMETER_DOUBLE, raw
            elif kind == 2:
                raw = [-1, -(1 << 62), 1 << 62, 0][int(rng.integers(0, 4))]
                value.type, value.integer_value = ParameterType.PARAMETER_INTEGER, raw
            elif kind == 3:
                raw = bool(rng.random() < 0.5)
                value.type, value.bool_value = ParameterType.PARAMETER_BOOL, raw
            else:
                value.type, value.byte_array_value, raw = (
                    ParameterType.PARAMETER_BYTE_ARRAY, [b'\x00'], [b'\x00'])
            try:
                spec.check(raw)
            except ConfigError:
                return SetParameters.Request(parameters=[Parameter(name=spec.name,
                                                                   value=value)])
        return SetParameters.Request(parameters=[Parameter(
            name=f'no.such.{int(rng.integers(0, 1000))}',
            value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value='x'))])
    return make


@dataclass(frozen=True)
class RosInput:
    """One input of one node."""

    node: str           # graph key of the node that takes it
    kind: str           # 'topic', 'service' or 'parameters'
    name: str           # topic or service name (absolute)
    make: Callable[[np.random.Generator], Any]
    qos: str = 'reliable'


def _inputs() -> dict[str, RosInput]:
    d, c = f'/{DEVICE_NS}', f'/{CLOUD_NS}'
    return {
        'device/image': RosInput('device', 'topic', f'{d}/image', hostile_image, 'sensor'),
        'device/question': RosInput('device', 'topic', f'{d}/question', hostile_question),
        'device/ask': RosInput('device', 'service', f'{d}/ask', hostile_ask),
        'device/dwc_delta': RosInput('device', 'topic', f'{d}/dwc_delta', hostile_delta,
                                     'delta'),
        'device/rollback': RosInput('device', 'service', f'{d}/rollback', hostile_rollback),
        'device/parameters': RosInput('device', 'parameters', f'{d}/device_node/set_parameters',
                                      bad_parameter('device_node')),
        'camera/parameters': RosInput('camera', 'parameters', f'{d}/camera_node/set_parameters',
                                      bad_parameter('camera_node')),
        'device_bridge/uts_tokens': RosInput('device_bridge', 'topic', f'{d}/uts_tokens',
                                             hostile_tokens),
        'device_bridge/parameters': RosInput('device_bridge', 'parameters',
                                             f'{d}/device_bridge/set_parameters',
                                             bad_parameter('cloud_bridge_node')),
        'cloud/uts_tokens': RosInput('cloud', 'topic', f'{c}/uts_tokens', hostile_tokens),
        'cloud/parameters': RosInput('cloud', 'parameters', f'{c}/cloud_node/set_parameters',
                                     bad_parameter('cloud_node')),
        'cloud_bridge/dwc_delta': RosInput('cloud_bridge', 'topic', f'{c}/dwc_delta',
                                           hostile_delta, 'delta'),
        'cloud_bridge/adaptation_status': RosInput('cloud_bridge', 'topic',
                                                   f'{c}/adaptation_status', hostile_status),
        'cloud_bridge/parameters': RosInput('cloud_bridge', 'parameters',
                                            f'{c}/cloud_bridge/set_parameters',
                                            bad_parameter('cloud_bridge_node')),
    }


INPUTS: dict[str, RosInput] = _inputs()


def _qos(kind: str) -> Any:
    from cdcca_ros.nodes.common import DELTA_QOS, RELIABLE_QOS, SENSOR_QOS

    return {'sensor': SENSOR_QOS, 'delta': DELTA_QOS, 'reliable': RELIABLE_QOS}[kind]


def _type_of(inp: RosInput, sample: Any) -> Any:
    if inp.kind == 'parameters':
        from rcl_interfaces.srv import SetParameters

        return SetParameters
    if inp.kind == 'service':
        from cdcca_ros.srv import Ask, Rollback

        return Ask if inp.name.endswith('/ask') else Rollback
    return type(sample)


def send_input(client: Any, inp: RosInput, count: int, rng: np.random.Generator,
               timeout_s: float = 10.0) -> dict[str, Any]:
    """Send ``count`` hostile messages (or calls) to one input; what came back."""
    t0 = time.monotonic()
    out: dict[str, Any] = {'messages': 0, 'refused': 0, 'accepted': 0, 'timeouts': 0}
    first = inp.make(rng)
    msg_type = _type_of(inp, first)
    if inp.kind == 'topic':
        pub = client.publisher(msg_type, inp.name, _qos(inp.qos))
        client.spin_until(lambda: pub.get_subscription_count() > 0, 10.0)
        msg = first
        for _ in range(count):
            pub.publish(msg)
            out['messages'] += 1
            msg = inp.make(rng)
    else:
        service = client.node.create_client(msg_type, inp.name)
        if not client.spin_until(service.service_is_ready, 15.0):
            out['timeouts'] = out['messages'] = count  # the node is gone: nothing answers
            count = 0
        req = first
        for _ in range(count):
            resp = client.call(service, req, timeout_s)
            out['messages'] += 1
            if resp is None:
                out['timeouts'] += 1
            elif inp.kind == 'parameters':
                ok = all(r.successful for r in resp.results)
                out['accepted' if ok else 'refused'] += 1
            else:
                out['accepted' if resp.success else 'refused'] += 1
            req = inp.make(rng)
        client.node.destroy_client(service)
    out['seconds'] = round(time.monotonic() - t0, 1)
    return out


def _fresh_diag(client: Any, name: str, timeout_s: float = 10.0) -> dict[str, str]:
    """The next diagnostics of ``name`` published after now."""
    client.diagnostics.pop(next((k for k in client.diagnostics if name in k), ''), None)
    client.spin_until(lambda: bool(client.diag(name)), timeout_s)
    return client.diag(name)


def good_questions(n: int = 6) -> list[tuple[str, Any]]:
    """(question, image message) pairs of the synthetic world, for before/after answers."""
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.sim.world import World

    samples = World(5).samples('source', n, image_size=(64, 48))
    return [(s.question, image_to_msg(s.image, 'rgb8', Image)) for s in samples]


def fuzz_ros_inputs(names: list[str], per_input: int, workdir: Path, *, seed: int = 0,
                    overrides: dict[str, Any] | None = None,
                    keep_log: Path | None = None) -> dict[str, Any]:
    """Start the demo graph, send ``per_input`` hostile messages to each input, check it;
    ``keep_log``: where to copy the nodes' log."""
    from cdcca_ros.bench.graph import Client, Graph

    rng = np.random.default_rng(seed)
    settings = {'cloud.round.min_samples': '1000000', 'cloud.round.max_wait_s': '1000000.0',
                'camera.fps': '1', **(overrides or {})}
    result: dict[str, Any] = {'inputs': {}}
    t0 = time.monotonic()
    with Graph(workdir, settings) as graph:
        graph.start()
        client = Client('fuzz_client')
        try:
            good = good_questions()
            if not client.wait_ready(good[0][1], 240.0):
                raise RuntimeError(f'the device never answered; see {workdir / "nodes.log"}')
            result['startup_s'] = round(time.monotonic() - t0, 1)

            def answers() -> list[str]:
                out = []
                for q, image in good:
                    r = client.ask(q, image)
                    out.append(r.answer.answer if r is not None and r.success else '<none>')
                return out

            before = answers()
            hash0 = _fresh_diag(client, 'device_node').get('hash')
            for name in names:
                inp = INPUTS[name]
                sent = send_input(client, inp, per_input, rng)
                client.spin_for(2.0)  # let the nodes work through the batch
                alive = graph.alive()
                diag = _fresh_diag(client, 'device_node')
                sent.update(node_alive=bool(alive.get(inp.node)),
                            all_alive=all(alive.values()),
                            adapter_changed=diag.get('hash') != hash0)
                result['inputs'][name] = sent
                print(f'  ros {name}: {sent}', flush=True)
            after = answers()
            result['answers_unchanged'] = after == before
            result['answers'] = {'before': before, 'after': after}
            result['nodes_down'] = [k for k, v in graph.alive().items() if not v]
            diags = {key: _fresh_diag(client, key) for key in (
                'device_node', 'device_bridge', 'cloud_node', 'cloud_bridge', 'camera_node')}
            result['diagnostics'] = diags
            counts = {
                'device.rejected_images': diags['device_node'].get('rejected_images'),
                'device.deltas_rejected': diags['device_node'].get('deltas_rejected'),
                'device.questions_refused': diags['device_node'].get('questions_refused'),
                'device.deltas_other_device': diags['device_node'].get('deltas_other_device'),
                'device_bridge.refused': diags['device_bridge'].get('refused'),
                'cloud.samples_rejected': diags['cloud_node'].get('samples_rejected'),
                'cloud_bridge.refused': diags['cloud_bridge'].get('refused'),
            }
            result['refusal_counters'] = counts
            result['refusals_counted'] = all(
                v not in (None, '0') for k, v in counts.items()
                if k.split('.')[0] in {INPUTS[n].node for n in names})
        finally:
            client.close()
    if keep_log is not None:
        import shutil

        shutil.copyfile(workdir / 'nodes.log', keep_log)
        result['nodes_log'] = str(keep_log)
    return result
