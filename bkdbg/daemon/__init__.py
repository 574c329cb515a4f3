"""The detached bkdbg server: its gRPC API, build and container state, I/O forwarding."""
