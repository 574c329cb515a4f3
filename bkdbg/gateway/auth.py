"""Auth.Credentials: registry credentials from the Docker CLI configuration.

The lookup follows the Docker CLI (cli/config/configfile), as BuildKit's auth provider
does. The file is `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. A
`credHelpers` entry for the host, else `credsStore`, names a program that is run as
`docker-credential-<name> get`. Otherwise the `auths` entry for the host gives the
credentials (its base64 `auth`, or `identitytoken`). Docker Hub's host
`registry-1.docker.io` is looked up as `https://index.docker.io/v1/`. With nothing
found, the credentials are anonymous (empty).

FetchToken, GetTokenAuthority and VerifyTokenAuthority return UNIMPLEMENTED, and then
BuildKit fetches tokens itself with these credentials (util/resolver/authorizer.go).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

import grpc

from bkdbg.buildkit_proto import auth_pb2

logger = logging.getLogger(__name__)

DOCKER_HUB_HOST = "registry-1.docker.io"
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
TOKEN_USERNAME = "<token>"  # a helper's username for an identity token
HELPER_TIMEOUT = 30.0  # seconds for one `docker-credential-<name> get`
NOT_FOUND_MESSAGE = "credentials not found in native keychain"


@dataclass(frozen=True)
class Credentials:
    """The result of Auth.Credentials: a username and password, or only a token."""

    username: str = ""
    secret: str = ""


class CredentialsError(Exception):
    """A credential helper failed for another reason than missing credentials."""


def docker_config_path(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    directory = env.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def load_docker_config(path: str) -> dict[str, Any]:
    """Return the parsed config file, or {} when it is missing or invalid (as docker does)."""
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring Docker config %s: %s", path, exc)
        return {}
    return config if isinstance(config, dict) else {}


def lookup_credentials(host: str, config: dict[str, Any]) -> Credentials:
    """Return the credentials for a registry host; raise CredentialsError if a helper fails."""
    key = DOCKER_HUB_CONFIG_KEY if host == DOCKER_HUB_HOST else host
    helpers = config.get("credHelpers") or {}
    helper = helpers.get(key) if isinstance(helpers, dict) else None
    helper = helper or config.get("credsStore")
    if helper:
        return run_credential_helper(str(helper), key)
    return _from_auths(key, config.get("auths") or {})


def _from_auths(key: str, auths: dict[str, Any]) -> Credentials:
    entry = auths.get(key)
    if entry is None:
        # older config files key entries by URL: compare their host names
        for name in sorted(auths):
            if _hostname(name) == key:
                entry = auths[name]
                break
    if not isinstance(entry, dict):
        return Credentials()
    if entry.get("identitytoken"):
        return Credentials(secret=str(entry["identitytoken"]))
    username, password = str(entry.get("username") or ""), str(entry.get("password") or "")
    if entry.get("auth"):
        username, password = _decode_auth(str(entry["auth"]), key)
    return Credentials(username, password)


def _decode_auth(value: str, key: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        logger.warning("ignoring invalid auth value for %s in the Docker config", key)
        return "", ""
    username, _, password = decoded.partition(":")
    return username, password


def _hostname(url: str) -> str:
    """Return the host of a config key such as https://index.docker.io/v1/ (docker's rule)."""
    stripped = url.removeprefix("http://").removeprefix("https://")
    return stripped.split("/", 1)[0]


def run_credential_helper(name: str, server_url: str) -> Credentials:
    """Run `docker-credential-<name> get` for a server URL; empty when it has nothing."""
    program = f"docker-credential-{name}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CredentialsError(
            f"credential helper not found: {program}: install it or remove it from the "
            "Docker config"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CredentialsError(f"credential helper timed out: {program}") from exc
    output = result.stdout.decode("utf-8", "replace").strip()
    if result.returncode != 0:
        errors = result.stderr.decode("utf-8", "replace")
        if NOT_FOUND_MESSAGE in output or NOT_FOUND_MESSAGE in errors:
            return Credentials()
        raise CredentialsError(f"credential helper failed: {program}: {output[:200]}")
    try:
        answer = json.loads(output)
    except ValueError as exc:
        raise CredentialsError(f"credential helper returned invalid JSON: {program}") from exc
    username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    if username == TOKEN_USERNAME:
        return Credentials(secret=secret)
    return Credentials(username, secret)


class AuthService:
    """Serves registry credentials (service moby.filesync.v1.Auth)."""

    SERVICE = "moby.filesync.v1.Auth"
    METHODS = ("/moby.filesync.v1.Auth/Credentials",)

    def __init__(self, config_path: str | None = None) -> None:
        self._config_path = config_path
        self._cache: dict[str, Credentials] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to prepare: the config is read on the first request."""

    def close(self) -> None:
        self._cache.clear()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self.credentials,
            request_deserializer=auth_pb2.CredentialsRequest.FromString,
            response_serializer=auth_pb2.CredentialsResponse.SerializeToString,
        )
        # the token methods are not registered, so the server returns UNIMPLEMENTED for them
        return grpc.method_handlers_generic_handler(self.SERVICE, {"Credentials": method})

    def credentials(
        self, request: auth_pb2.CredentialsRequest, context: grpc.ServicerContext
    ) -> auth_pb2.CredentialsResponse:
        host = request.Host
        try:
            found = self._lookup(host)
        except CredentialsError as exc:
            logger.warning("no credentials for %s: %s", host, exc)
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to get credentials for {host}: {exc}")
        logger.info("credentials for %s: %s", host, "found" if found.secret else "anonymous")
        return auth_pb2.CredentialsResponse(Username=found.username, Secret=found.secret)

    def _lookup(self, host: str) -> Credentials:
        # one lock, as BuildKit's provider has: some credential helpers hang when run
        # concurrently (docker/cli#1862)
        with self._lock:
            if host not in self._cache:
                path = self._config_path or docker_config_path()
                self._cache[host] = lookup_credentials(host, load_docker_config(path))
            return self._cache[host]
