"""Gadget properties from the front ends' transports, and the pipeline they configure.

A Gadgetron chain gives ``<property name=.. value=..>`` elements (:func:`properties_from_xml`,
:func:`properties_from_config_text` for a whole chain or ``<configuration>``), the FIRE client and MRD
streams a JSON TEXT message (:func:`properties_from_json`).  :func:`kmotion_pipeline` turns the properties
into the configured motion-correction pipeline (``GadgetParams.from_properties``): the
``Iterable[object] -> Iterator[object]`` every front end runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ismrmrd.xsd

from kmotion.io.ismrmrd_header import LenientHeader
from kmotion.io.mrd_v1 import ProtocolError

__all__ = [
    "ADAPTER_PROPERTIES",
    "Pipeline",
    "PipelineFactory",
    "kmotion_pipeline",
    "properties_from_config_text",
    "properties_from_json",
    "properties_from_xml",
]

log = logging.getLogger("kmotion.gadget")

#: Properties of the Gadgetron adapter itself (not GadgetParams), with defaults; other modes ignore them.
ADAPTER_PROPERTIES = {"send_text": "false", "idle_timeout_s": "1800", "max_message_mb": "1024"}


def properties_from_xml(root: Any) -> dict[str, str]:
    """``<property name=... value=...>`` children of an ElementTree element (v2 and legacy forms).

    The legacy form ``<property><name>n</name><value>v</value></property>`` is read as well, as Gadgetron
    does.  ``root`` None (Gadgetron sends an empty configuration when ``<external>`` has none) gives {}.
    """
    props: dict[str, str] = {}
    if root is None:
        return props
    for p in root.iter("property"):
        name = p.get("name")
        value = p.get("value")
        if name is None:
            name = p.findtext("name")
            value = p.findtext("value")
        if name is None or value is None:
            raise ProtocolError("configuration: a <property> needs a name and a value (attributes)")
        props[name.strip()] = value.strip()
    return props


def properties_from_json(text: str) -> dict[str, str]:
    """Gadget properties from a JSON TEXT message (flat, or python-ismrmrd-server's ``{"parameters": ...}``).

    FIRE's own keys ``config`` and ``customconfig`` are ignored; booleans become ``true``/``false``.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"TEXT parameters: expected a JSON object, got invalid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"TEXT parameters: expected a JSON object, got {type(obj).__name__}")
    params = obj.get("parameters", obj)
    if not isinstance(params, dict):
        raise ProtocolError("TEXT parameters: 'parameters' must be a JSON object")
    out: dict[str, str] = {}
    for k, v in params.items():
        if k in ("config", "customconfig", "version"):
            continue
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif v is None:
            continue
        else:
            out[k] = str(v)
    return out


#: A configured pipeline: (items, header) -> output items (see :func:`kmotion_pipeline`); the header as the
#: front end has it: read leniently (:class:`~kmotion.io.ismrmrd_header.LenientHeader`) or already parsed.
Pipeline = Callable[[Iterable[object], ismrmrd.xsd.ismrmrdHeader | LenientHeader], Iterator[object]]
#: Builds a :data:`Pipeline` from gadget properties; raises InputError for bad properties.
PipelineFactory = Callable[[Mapping[str, str]], Pipeline]


def kmotion_pipeline(properties: Mapping[str, str]) -> Pipeline:
    """The motion-correction pipeline configured by ``properties`` (``GadgetParams.from_properties``).

    Bad properties raise :class:`InputError` here, before any data is read.
    """
    from kmotion.gadget import GadgetParams, motion_correct

    params = GadgetParams.from_properties(dict(properties))

    def run(items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader | LenientHeader) -> Iterator[object]:
        return motion_correct(items, header, params)

    return run


def properties_from_config_text(text: str) -> dict[str, str]:
    """Gadget properties from a CONFIG_TEXT: a ``<configuration>`` of properties or a whole chain XML.

    In a chain, the ``<configuration>`` of the ``<external>`` node that runs ``kmotion`` is used; a text
    that is not XML gives {} (it names a configuration, as Gadgetron's CONFIG_FILE does).  The Gadgetron
    adapter's own properties (:data:`ADAPTER_PROPERTIES`) are dropped.
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text.split("\0", 1)[0].strip())
    except ET.ParseError:
        log.info("CONFIG_TEXT is not XML; ignored")
        return {}
    props: dict[str, str] = {}
    externals = root.findall(".//external")
    if not externals and root.find("property") is not None:
        props = properties_from_xml(root)
    for ext in externals:
        ex = ext.find("execute")
        if ex is None or "kmotion" in (ex.get("name") or ""):
            props = properties_from_xml(ext.find("configuration"))
            break
    return {k: v for k, v in props.items() if k not in ADAPTER_PROPERTIES}
