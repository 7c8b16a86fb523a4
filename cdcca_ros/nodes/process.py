"""The process around a node: ``--help``, one FATAL line and an exit code for what stops it,
the package's Python logging on the node's ROS logger, quiet ML libraries.

Every node's ``main()`` is :func:`run_node` around a function that builds and spins it.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from cdcca_ros.errors import CdccaError
from cdcca_ros.nodes.dds_profile import use_dds_profile
from cdcca_ros.nodes.tables import TABLES


class RosLogHandler(logging.Handler):
    """Forwards Python ``logging`` records to a node's ROS logger (console and /rosout)."""

    def __init__(self, node: Node) -> None:
        super().__init__(logging.INFO)
        self._logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
            return
        # One call site per severity: rclpy refuses one site logging at several severities.
        if record.levelno >= logging.CRITICAL:
            self._logger.fatal(text)
        elif record.levelno >= logging.ERROR:
            self._logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(text)
        elif record.levelno >= logging.INFO:
            self._logger.info(text)
        else:
            self._logger.debug(text)


def route_logging(node: Node, name: str = 'cdcca_ros') -> Callable[[], None]:
    """Send the Python log records of logger ``name`` (INFO and up) to ``node``'s ROS logger.

    Returns:
        A function that undoes it.
    """
    logger = logging.getLogger(name)
    handler = RosLogHandler(node)
    previous = (logger.level, logger.propagate)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # not printed a second time by a parent's handler

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]
    return undo


def quiet_libraries() -> None:
    """Silence what the ML libraries print on every node start and a person cannot act on:
    the weights-loading progress bar (transformers / huggingface_hub) and bitsandbytes' hint to
    install ``kernels`` (which this project must not install). Progress bars stay on for long
    work a person waits on (benchmarks, training), which never calls this."""
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    if 'transformers' in sys.modules:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.disable_progress_bar()
    logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)


def one_line(err: BaseException | str) -> str:
    """An error as one line: its type (for exceptions outside the package) and message."""
    text = ' '.join(str(err).split())
    if isinstance(err, BaseException) and not isinstance(err, CdccaError):
        text = f'{type(err).__name__}: {text}'
    return text


def fail(node: Node, message: str) -> None:
    """The node can never work: one FATAL line, then the process ends with a non-zero code.

    Sets the node's ``fatal_error``: a :class:`NodeSpinner` built with ``stop_when=`` that
    attribute stops spinning, and :func:`exit_code` turns it into the process's exit code (the
    runner then stops the rest of the set). Safe from any thread.
    """
    node.fatal_error = message
    node.get_logger().fatal(message)


def failed(*nodes: Node) -> Callable[[], bool]:
    """A ``stop_when`` predicate: whether one of ``nodes`` called :func:`fail`."""
    return lambda: any(getattr(n, 'fatal_error', None) for n in nodes)


def usage(name: str, table: str | None, doc: str | None) -> str:
    """The ``--help`` text of a node: its docstring, how to set parameters, the table."""
    lines = [f'usage: python -m cdcca_ros.nodes.{name} [--ros-args -p NAME:=VALUE ...]',
             f'       ros2 run cdcca_ros {name} [--ros-args ...]', '']
    if doc:
        lines += [doc.strip(), '']
    if table:
        lines.append('parameters (runtime: settable while running; others read-only):')
        for p in TABLES[table]:
            extra = f' (one of: {", ".join(p.choices)})' if p.choices else ''
            extra += f' {p.range_text}' if p.range_text else ''
            flag = 'runtime' if p.runtime else ''
            lines.append(f'  {p.name} = {p.default!r}  {flag}'.rstrip())
            lines.append(f'      {p.description}{extra}')
    return '\n'.join(lines)


def run_node(name: str, spin: Callable[[list[str] | None], int | None],
             args: list[str] | None = None, *, table: str | None = None,
             doc: str | None = None, quiet: bool = False) -> int:
    """Run a node process: ``--help``, rclpy init, one FATAL line for an error that stops it.

    Args:
        name: the node's executable name.
        spin: creates the node(s) and spins; returns the exit code (None: 0). Runs inside
            ``rclpy.init``; a :class:`~cdcca_ros.errors.CdccaError` it raises (a bad
            parameter, a model that cannot load) becomes one FATAL line and exit code 1.
        args: the command line (None: ``sys.argv``).
        table: the node's parameter table, for ``--help``.
        doc: the node module's docstring, for ``--help``.
        quiet: the process holds the ML libraries: silence their start-up output
            (:func:`quiet_libraries`) and, once the node is down, leave without Python's
            finalization (:func:`leave`).

    Returns:
        The process exit code: 0 after Ctrl-C / SIGTERM, 1 after a fatal error, 2 for a bad
        command line.
    """
    import rclpy  # noqa: PLC0415
    from rclpy.logging import get_logger  # noqa: PLC0415
    from rclpy.utilities import remove_ros_args  # noqa: PLC0415

    argv = list(sys.argv if args is None else args)
    extra = remove_ros_args(argv)[1:]
    if '-h' in extra or '--help' in extra:
        print(usage(name, table, doc))
        return 0
    if extra:
        print(f'{name}: unexpected argument(s) {" ".join(extra)}; parameters go after '
              f'--ros-args, e.g. --ros-args -p NAME:=VALUE (--help lists them)',
              file=sys.stderr)
        return 2
    if quiet:
        quiet_libraries()
    use_dds_profile()
    code = 0
    try:
        with rclpy.init(args=argv):
            try:
                code = spin(argv) or 0
            except CdccaError as err:
                get_logger(name).fatal(one_line(err).removeprefix(f'{name}: '))
                code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        code = 0
    if quiet:
        leave(code)
    return code


def leave(code: int) -> NoReturn:
    """End the process now that its nodes are down: the ``atexit`` handlers (adapter writers
    flush there), the standard streams, then ``os._exit``.

    Python's own finalization garbage-collects the whole torch / transformers heap first: 2-7 s
    on a loaded 2-core machine, longer than the 5 s ``ros2 launch`` waits after SIGINT before
    it escalates to SIGTERM and reports the node as died. Nothing is left to it: the nodes are
    destroyed and the context is shut down before this is called.
    """
    try:
        atexit._run_exitfuncs()  # the documented handlers, run as a normal exit would
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def exit_code(nodes: Sequence[Node]) -> int:
    """1 when one of ``nodes`` failed (:func:`fail`), else 0."""
    return 1 if any(getattr(n, 'fatal_error', None) for n in nodes) else 0
