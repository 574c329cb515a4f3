"""Protobuf and gRPC modules for BuildKit's wire API, generated from the .proto files here."""
