"""Ask the robot a question from a shell, with or without the ``ros2`` command line.

    python -m cdcca_ros.ask "what color is the circle?"
    python -m cdcca_ros.ask --service /robot7/ask "how many objects are there?"
    python -m cdcca_ros.ask --image photo.png "is there a red square?"

Calls the device node's ``ask`` service (``cdcca_ros/srv/Ask``) about its latest camera frame,
or about a picture file with ``--image``, and prints the answer with its confidence, entropy,
model version and latency. The same call with the ROS 2 command line:

    ros2 service call /robot1/ask cdcca_ros/srv/Ask "{question: 'what color is the circle?'}"

Exit code 0 with an answer, 1 when the device answered no (the reason is printed), 2 when no
``ask`` service was found in time.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _image_msg(path: str):
    import cv2
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f'cannot read an image from {path!r}')
    return image_to_msg(bgr, 'bgr8', Image)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.ask', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('question', help='the question, e.g. "what color is the circle?"')
    parser.add_argument('--service', default='/robot1/ask',
                        help='the device node\'s ask service (default: %(default)s)')
    parser.add_argument('--choices', nargs='+', default=[], metavar='CHOICE',
                        help='multiple-choice options (the answer is one of them)')
    parser.add_argument('--image', help='answer about this picture file instead of the latest '
                                        'camera frame')
    parser.add_argument('--no-uplink', action='store_true',
                        help='do not offer the sample for adaptation (evaluation)')
    parser.add_argument('--timeout', type=float, default=30.0,
                        help='seconds to wait for the service and the answer '
                             '(default: %(default)s)')
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor

    from cdcca_ros.nodes.dds_profile import use_dds_profile
    from cdcca_ros.srv import Ask

    request = Ask.Request(question=args.question, choices=list(args.choices),
                          no_uplink=args.no_uplink)
    if args.image:
        try:
            request.image, request.use_image = _image_msg(args.image), True
        except OSError as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
    use_dds_profile()  # a frame inside the request fits the nodes' shared-memory segments
    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node('cdcca_ask', context=context)
    try:
        client = node.create_client(Ask, args.service)
        if not client.wait_for_service(timeout_sec=args.timeout):
            print(f'error: no ask service at {args.service} after {args.timeout:g} s (is the '
                  'device set running, on this ROS_DOMAIN_ID, in that namespace?)',
                  file=sys.stderr)
            return 2
        future = client.call_async(request)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.spin_until_future_complete(future, timeout_sec=args.timeout)
        if not future.done():
            print(f'error: no answer within {args.timeout:g} s', file=sys.stderr)
            return 2
        response = future.result()
        if not response.success:
            print(f'not answered: {response.message}', file=sys.stderr)
            return 1
        a = response.answer
        print(f'{a.answer}  (confidence {a.confidence:.2f}, entropy {a.entropy_mean:.2f} nats, '
              f'{a.model_version}, {a.latency_ms:.1f} ms)')
        return 0
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


if __name__ == '__main__':
    sys.exit(main())
