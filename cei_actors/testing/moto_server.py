"""moto's EC2-compatible server on 127.0.0.1 for tests, benchmarks and developers.

The server is ``python -m moto.server -H 127.0.0.1 -p PORT``, a separate process (the real
HTTP API, signatures and XML, not an in-process mock), on a free loopback port, stopped by
:meth:`MotoServer.stop` (or the ``with`` block's end). moto must be installed (the ``test``
extra: ``moto[server]``).

    with MotoServer() as moto:
        site = {"type": "ec2", "region": "us-east-1", "host": "127.0.0.1",
                "port": moto.port, "secure": False}
        ec2 = moto.boto3("ec2")              # a boto3 client on the same server (boto3 ships
        ec2.terminate_instances(...)         # with moto): change things behind our back

moto accepts any credentials until :meth:`MotoServer.require_auth` turns its IAM checks on;
the access keys of :meth:`MotoServer.make_user` then work and any other key is refused
(``AuthFailure``). :meth:`MotoServer.reset` wipes every resource, as if an operator deleted
everything behind our back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..runtime.system import LOOPBACK, free_port

__all__ = ["MotoServer", "MotoUnavailable", "unavailable_reason"]

#: Credentials moto accepts while its IAM checks are off (any would do).
DEFAULT_ACCESS_KEY = "AKIDCEITESTING000000"
DEFAULT_SECRET_KEY = "cei-moto-testing-secret"


class MotoUnavailable(RuntimeError):
    """moto's server cannot be started here (not installed, or it did not come up)."""


def unavailable_reason() -> str | None:
    """Why no moto server can be started here, or None."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        return f"moto[server] is not installed ({exc}); install the test extra"
    return None


class MotoServer:
    """One moto server process on a free port of ``host`` (default loopback; see the module
    docstring)."""

    def __init__(self, port: int | None = None, start_timeout: float = 60.0,
                 host: str = LOOPBACK) -> None:
        #: the address it listens on: loopback, or e.g. a test network's bridge address so
        #: that network-namespace hosts reach it (never a wildcard)
        self.host = host
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self.log_path: Path | None = None
        self._images: dict[str, str] = {}

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle

    def start(self) -> MotoServer:
        reason = unavailable_reason()
        if reason:
            raise MotoUnavailable(reason)
        self._dir = tempfile.mkdtemp(prefix="cei-moto-")
        self.log_path = Path(self._dir) / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=DEFAULT_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=DEFAULT_SECRET_KEY,
                   AWS_DEFAULT_REGION="us-east-1",
                   # refuse unknown images and instance types, as EC2 does
                   MOTO_ENABLE_AMI_VALIDATION="true",
                   MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION="true",
                   # no catalogue of 1,300 public images: each region starts in a second
                   MOTO_EC2_LOAD_DEFAULT_AMIS="false")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self._dir, start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                why = f"moto server exited with {self.proc.returncode}: {self.log_tail()}"
                self.stop()
                raise MotoUnavailable(why)
            try:
                self._api("GET", "/moto-api/data.json", timeout=2.0)
                return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise MotoUnavailable(f"moto server did not answer within {self.start_timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> MotoServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ---- moto's own API

    def _api(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def reset(self) -> None:
        """Delete every resource of every account and region (moto's reset API)."""
        self._api("POST", "/moto-api/reset")
        self._images.clear()

    def require_auth(self) -> None:
        """Turn on moto's IAM checks: from now on only keys of :meth:`make_user` work."""
        self._api("POST", "/moto-api/reset-auth", 0)

    def make_user(self, name: str = "cei-provisioner") -> dict[str, str]:
        """An IAM user allowed every EC2 action; its ``access_key`` and ``secret_key``.

        Call before :meth:`require_auth` (creating users needs no auth yet)."""
        iam = self.boto3("iam")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="ec2-all",
                            PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}

    # ---- clients and site descriptions

    def boto3(self, service: str = "ec2", region: str = "us-east-1",
              credentials: dict[str, str] | None = None) -> Any:
        """A boto3 client of ``service`` on this server."""
        import boto3

        creds = credentials or self.credentials()
        return boto3.client(service, endpoint_url=self.endpoint, region_name=region,
                            aws_access_key_id=creds["access_key"],
                            aws_secret_access_key=creds["secret_key"])

    @staticmethod
    def credentials() -> dict[str, str]:
        """Credentials moto accepts while its IAM checks are off."""
        return {"access_key": DEFAULT_ACCESS_KEY, "secret_key": DEFAULT_SECRET_KEY}

    def site(self, region: str = "us-east-1") -> dict[str, Any]:
        """An ``ec2`` site description pointing at this server."""
        return {"type": "ec2", "region": region, "host": self.host, "port": self.port,
                "secure": False}

    def image_id(self, region: str = "us-east-1") -> str:
        """The id of an image registered in ``region`` (once; the same id after)."""
        if region not in self._images:
            ec2 = self.boto3("ec2", region)
            self._images[region] = ec2.register_image(
                Name="cei-test-image", RootDeviceName="/dev/sda1", Architecture="x86_64",
                VirtualizationType="hvm")["ImageId"]
        return self._images[region]
