"""The device-cloud link over Zenoh: sessions, TLS/ACL config, chunking, spool, recording."""
