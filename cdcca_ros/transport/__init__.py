"""The device-cloud link over Zenoh: sessions, TLS/ACL config, chunking, spool, recording.

Modules (none imports rclpy; the link carries opaque bytes, e.g. CDR from
``rclpy.serialization.serialize_message``):

- :mod:`.keys`: key expressions ``<prefix>/<device>/{up,down}/...`` and device-id checks.
- :mod:`.certs`: CA, router, cloud and per-device certificates (CLI).
- :mod:`.config`: Zenoh configurations: router (mTLS + access control), device/cloud clients.
- :mod:`.router`: a router as a Python Zenoh session (CLI).
- :mod:`.framing`: versioned, checksummed frames; chunking and reassembly.
- :mod:`.spool`: SQLite spool (sender) and inbox (receiver dedup), bounded, persistent.
- :mod:`.link`: :class:`~.link.DeviceLink` and :class:`~.link.CloudLink`.
- :mod:`.recording`: MCAP recording of received messages and replay (CLI).
- :mod:`.peer`: a JSON-lines command-line end of the link, for manual checks and tests.
"""
