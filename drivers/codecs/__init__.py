"""Pure payload codecs for LoRaWAN sensors, one module per vendor family.

A codec is ``(fport, payload) -> dict``: the ``data`` object the vendor's reference decoder in
TTN's device repository returns for that frame, so readings decoded here compare equal to TTN's.
A payload the codec cannot decode raises ``CodecError`` and nothing else. Codecs do no I/O, keep
no state and never log.

``CODECS`` is the explicit registry the device catalog names codecs by; keys are
``<vendor>-<TTN codec id>``, stable across releases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drivers.codecs import decentlab, dragino, elsys, milesight
from gateway.errors import CodecError

__all__ = ["CODECS", "Codec", "CodecError", "get_codec"]

Codec = Callable[[int, bytes], dict[str, Any]]

CODECS: dict[str, Codec] = {
    # Water level / distance / pressure.
    "dragino-ldds20": dragino.decode_ldds20,
    "dragino-ldds20-114": dragino.decode_ldds20_114,
    "dragino-ldds75-114": dragino.decode_ldds75_114,
    "dragino-lmds200": dragino.decode_lmds200,
    "decentlab-dl-pr21-1-10": decentlab.decode_dl_pr21_1_10,
    "decentlab-dl-pr26-0-1": decentlab.decode_dl_pr26_0_1,
    "decentlab-dl-pr36-8192": decentlab.decode_dl_pr36_8192,
    "decentlab-dl-ctd10": decentlab.decode_dl_ctd10,
    "elsys-elt-ultrasonic": elsys.decode_elt_ultrasonic,
    "milesight-em400-udl": milesight.decode_em400_udl,
    "milesight-em410-rdl": milesight.decode_em410_rdl,
    # Climate and buildings.
    "dragino-lht65": dragino.decode_lht65,
    "elsys": elsys.decode_elsys,
    "elsys-ers": elsys.decode_ers,
    "elsys-ers-co2": elsys.decode_ers_co2,
    "elsys-ers-co2-lite": elsys.decode_ers_co2_lite,
    "elsys-ers-lite": elsys.decode_ers_lite,
    "elsys-ers-eye": elsys.decode_ers_eye,
    "elsys-ers-sound": elsys.decode_ers_sound,
    "elsys-ers-voc": elsys.decode_ers_voc,
    "elsys-elt-2": elsys.decode_elt_2,
    "elsys-ems": elsys.decode_ems,
    "elsys-ems-desk": elsys.decode_ems_desk,
    "elsys-ems-door": elsys.decode_ems_door,
    "elsys-ems-lite": elsys.decode_ems_lite,
}


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``; ``KeyError`` lists the known names otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        known = ", ".join(sorted(CODECS))
        raise KeyError(f"unknown codec {name!r}; known codecs: {known}") from None
