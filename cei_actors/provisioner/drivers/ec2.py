"""The Provisioner's EC2 driver: libcloud's own ``EC2NodeDriver``, pointed at a region or at an
EC2-compatible endpoint (moto's server in the tests).

What differs from ``get_driver(Provider.EC2)`` with no options (decisions CL1, CL2):

- the endpoint is configuration: ``host``/``port``/``secure`` of the site, else the region's
  public endpoint; requests are signed with Signature Version 4 (what EC2-compatible servers
  route by, and what every region takes), leaving ``User-Agent`` out as the AWS SDKs do;
- responses are read whatever EC2 API version their XML namespace names. libcloud looks its
  elements up in the namespace of the version it asks for, ``.../doc/2016-11-15/``; EC2 answers
  in it, but an EC2-compatible server may spell it otherwise (moto 5 drops the final slash),
  and libcloud would then see an empty answer: a created VM read as none. Elements of any
  ``http://ec2.amazonaws.com/doc/...`` namespace are renamed into libcloud's before it reads
  them; an answer from EC2 itself is left as it is. Error bodies are rewritten into EC2's
  ``Response/Errors/Error`` form, so the cloud's error code reaches the failure reason;
- a create with a client token first looks for the VM made for that token, by its tags.

:func:`node_tags` is what each VM is tagged with, :func:`tag_filters` how a listing asks for
this system's VMs only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree as ET

from libcloud.compute.drivers.ec2 import NAMESPACE, EC2Connection, EC2NodeDriver, EC2Response

__all__ = [
    "EC2_NAMESPACE_PREFIX",
    "TAG_PREFIX",
    "CEIEC2NodeDriver",
    "ec2_driver",
    "node_tags",
    "tag_filters",
]

EC2_NAMESPACE_PREFIX = "{http://ec2.amazonaws.com/doc/"
_LIBCLOUD_NS = "{" + NAMESPACE + "}"
#: Every tag this system puts on a VM starts with this.
TAG_PREFIX = "cei:"


def _normalise(root: Any) -> Any:
    """Rename elements of any EC2 API namespace into libcloud's (in place; ElementTree's or
    lxml's elements, whichever libcloud parses with)."""
    if not callable(getattr(root, "iter", None)):
        return root
    for elem in root.iter():
        tag = elem.tag
        if (isinstance(tag, str) and tag.startswith(EC2_NAMESPACE_PREFIX)
                and not tag.startswith(_LIBCLOUD_NS)):
            elem.tag = _LIBCLOUD_NS + tag[tag.index("}") + 1:]
    return root


class CEIEC2Response(EC2Response):
    """``EC2Response`` that reads any EC2 API namespace (see the module docstring)."""

    def parse_body(self) -> Any:
        return _normalise(super().parse_body())

    def parse_error(self) -> Any:
        # libcloud reads ``Response/Errors/Error`` with exactly ``Code`` and ``Message``, as
        # EC2 sends it; an EC2-compatible server may wrap it otherwise (a namespace, an
        # ``ErrorResponse`` root, a ``Type`` element): rewrite it into EC2's form first.
        if isinstance(self.body, str | bytes):
            self.body = _canonical_error(self.body)
        return super().parse_error()


def _canonical_error(body: str | bytes) -> str | bytes:
    """An error body in EC2's own form, or ``body`` unchanged if it holds no ``Error``."""
    try:
        root = ET.XML(body)
    except ET.ParseError:
        return body
    errors = [e for e in root.iter() if isinstance(e.tag, str) and _local(e.tag) == "Error"]
    if not errors:
        return body
    out = ET.Element("Response")
    into = ET.SubElement(out, "Errors")
    for err in errors:
        fields = {_local(child.tag): child.text or "" for child in err}
        item = ET.SubElement(into, "Error")
        ET.SubElement(item, "Code").text = fields.get("Code", "")
        ET.SubElement(item, "Message").text = fields.get("Message", "")
    return ET.tostring(out, encoding="unicode")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class CEIEC2Connection(EC2Connection):
    """``EC2Connection`` reading with :class:`CEIEC2Response`, signing as the AWS SDKs do."""

    responseCls = CEIEC2Response

    def pre_connect_hook(self, params: dict, headers: dict) -> tuple[dict, dict]:
        # The AWS SDKs leave User-Agent out of the signature (a proxy may rewrite it); an
        # endpoint that re-signs the way they do (moto) refuses a request that signed it.
        agent = headers.pop("User-Agent", None)
        params, headers = super().pre_connect_hook(params, headers)
        if agent is not None:
            headers["User-Agent"] = agent
        return params, headers


class CEIEC2NodeDriver(EC2NodeDriver):
    """libcloud's EC2 driver with :class:`CEIEC2Connection`; a create with a client token
    first looks for the VM already made for that token (see :meth:`create_node`)."""

    connectionCls = CEIEC2Connection

    def create_node(self, name: str, size: Any, image: Any, location: Any = None,
                    auth: Any = None, ex_clienttoken: str | None = None,
                    ex_metadata: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
        """``EC2NodeDriver.create_node``, but a token already used returns its VM.

        EC2 itself does this for a ``ClientToken``; an EC2-compatible endpoint may not (moto
        ignores the token and makes a second VM), so the driver first lists the VMs tagged
        with this node (``cei:node_id`` in ``ex_metadata``, else ``Name``) and returns the
        one that carries the token, whatever its state (decision D6)."""
        if ex_clienttoken:
            found = self.find_by_client_token(ex_clienttoken, name, ex_metadata)
            if found is not None:
                return found
        return super().create_node(name, size, image, location=location, auth=auth,
                                   ex_clienttoken=ex_clienttoken, ex_metadata=ex_metadata,
                                   **kwargs)

    def find_by_client_token(self, token: str, name: str | None = None,
                             tags: Mapping[str, str] | None = None) -> Any:
        """The VM created with client token ``token`` (looked up by its tags), or None."""
        node_id = (tags or {}).get(f"{TAG_PREFIX}node_id")
        filters = {f"tag:{TAG_PREFIX}node_id": node_id} if node_id else {"tag:Name": name}
        for node in self.list_nodes(ex_filters=filters):
            if node.extra.get("client_token") == token:
                return node
        return None


def ec2_driver(spec: Mapping[str, Any], access_key: str, secret_key: str,
               cls: type[CEIEC2NodeDriver] = CEIEC2NodeDriver) -> CEIEC2NodeDriver:
    """The driver (a ``cls``) of a checked ``ec2`` site (``region``, ``secure``, optional
    ``host``, ``port``). No network traffic happens here."""
    kwargs: dict[str, Any] = {"secure": spec["secure"], "region": spec["region"],
                              "signature_version": "4"}
    if spec.get("host"):
        kwargs["host"] = spec["host"]
    if spec.get("port") is not None:
        kwargs["port"] = spec["port"]
    return cls(access_key, secret_key, **kwargs)


def node_tags(system: str, node_id: str, launch_id: str | None = None,
              caller: str | None = None, deployable_type: str | None = None,
              domain: str | None = None) -> dict[str, str]:
    """The tags of one VM: the system's name, the node id and what launched it."""
    tags = {f"{TAG_PREFIX}system": system, f"{TAG_PREFIX}node_id": node_id}
    for key, value in (("launch_id", launch_id), ("caller", caller),
                       ("deployable_type", deployable_type), ("domain", domain)):
        if value:
            tags[TAG_PREFIX + key] = str(value)
    return tags


def tag_filters(system: str) -> dict[str, str]:
    """``list_nodes(ex_filters=...)`` for the VMs tagged as this system's."""
    return {f"tag:{TAG_PREFIX}system": system}
