"""Secrets.GetSecret: the values of `--secret` for `RUN --mount=type=secret`.

A secret comes from a file, read when BuildKit requests it (as buildx does), or from
the value the client read from its environment when it parsed `--secret id=…,env=…`.
Secret values never reach a log or an error message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from bkdbg.buildkit_proto import secrets_pb2
from bkdbg.options import SecretSpec

logger = logging.getLogger(__name__)

# BuildKit's secretsprovider.MaxSecretSize: larger secrets are rejected
MAX_SECRET_SIZE = 500 * 1024


class SecretsService:
    """Serves secrets by id (service moby.buildkit.secrets.v1.Secrets)."""

    SERVICE = "moby.buildkit.secrets.v1.Secrets"
    METHODS = ("/moby.buildkit.secrets.v1.Secrets/GetSecret",)

    def __init__(self, specs: Sequence[SecretSpec]) -> None:
        # like buildx, a later --secret with the same id replaces an earlier one
        self._specs = {spec.id: spec for spec in specs}

    def start(self) -> None:
        """Nothing to prepare: files are read when BuildKit requests them."""

    def close(self) -> None:
        """Nothing to release."""

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self.get_secret,
            request_deserializer=secrets_pb2.GetSecretRequest.FromString,
            response_serializer=secrets_pb2.GetSecretResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(self.SERVICE, {"GetSecret": method})

    def get_secret(
        self, request: secrets_pb2.GetSecretRequest, context: grpc.ServicerContext
    ) -> secrets_pb2.GetSecretResponse:
        secret_id = request.ID
        spec = self._specs.get(secret_id)
        if spec is None:
            # NOT_FOUND lets BuildKit skip a mount with required=false
            logger.info("secret %r requested but not given", secret_id)
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"secret not found: {secret_id}: pass --secret id={secret_id},src=PATH",
            )
        assert spec is not None
        data = self._read(spec, context)
        if len(data) > MAX_SECRET_SIZE:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"secret too large: {secret_id}: {len(data)} bytes, at most {MAX_SECRET_SIZE}",
            )
        logger.debug("sending secret %r (%d bytes)", secret_id, len(data))
        return secrets_pb2.GetSecretResponse(data=data)

    def _read(self, spec: SecretSpec, context: grpc.ServicerContext) -> bytes:
        if spec.src:
            try:
                with open(spec.src, "rb") as file:
                    return file.read(MAX_SECRET_SIZE + 1)
            except OSError as exc:
                logger.warning("failed to read secret %r from %s: %s", spec.id, spec.src, exc)
                context.abort(
                    grpc.StatusCode.UNKNOWN,
                    f"failed to read secret {spec.id}: {spec.src}: {exc.strerror}",
                )
        return (spec.value or "").encode()
