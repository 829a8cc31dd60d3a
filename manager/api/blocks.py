"""/api/v1/blocks: clients the gate refuses after too many invalid API keys (brute-force protection)."""

from __future__ import annotations

from flask import jsonify

from manager import blocks as blocks_mod
from manager.api.base import BOOL, INT, NUM, STR, STR_LIST, ApiBlueprint, author, bastion, obj

bp = ApiBlueprint("blocks", __name__, url_prefix="/api/v1/blocks")
BLOCK = obj(address=STR, since=NUM, until=NUM, retry_after=INT, blocks=INT, failures=INT, refused=INT)
CLEARED = obj(success=BOOL, cleared=STR_LIST, applied=BOOL)


@bp.op("GET", "", "Clients blocked after too many invalid API keys", response={"type": "array", "items": BLOCK})
def list_blocks():
    return jsonify(blocks_mod.listing(bastion()))


@bp.op("DELETE", "", "Lift every block and forget all failure counts", response=CLEARED)
def clear_all_blocks():
    return jsonify(success=True, **blocks_mod.clear(bastion(), None, author()))


@bp.op("DELETE", "/<path:address>", "Lift one client's block (an address, or an IPv6 /64)", response=CLEARED)
def clear_block(address: str):
    return jsonify(success=True, **blocks_mod.clear(bastion(), address, author()))
