"""The carts' part of the OpenAPI document: each cart's purchase, its order's body, and
the shapes a cart order has where a reservation's would be (the buyer's poll, the admin
calls on ``/reservations/{id}``)."""

from __future__ import annotations

from typing import Any

from gateway.config import CartSettings, Settings
from limiter.carts import CartState

Schema = dict[str, Any]
_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_CART_STATES = [s.value for s in CartState]
_ITEM_STATES = {"type": ["string", "null"], "description": "null: not reserved (yet)"}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def cart_body(settings: Settings, cart: CartSettings) -> Schema:
    """What a buyer sends to a cart's route: its items, each once."""
    most = max((c.max_quantity for c in settings.campaigns if c.id in cart.campaigns), default=1)
    return {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": cart.most_items,
                "items": {
                    "type": "object",
                    "required": ["campaign"],
                    "properties": {
                        "campaign": {"type": "string", "enum": list(cart.campaigns)},
                        "quantity": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": most,
                            "default": 1,
                            "description": "Up to the campaign's max_quantity.",
                        },
                    },
                    "additionalProperties": True,
                },
            }
        },
        "additionalProperties": True,
        "description": "Every item is reserved in its own campaign, or none is; each "
        "campaign at most once. The rest of the body goes to the backend untouched.",
    }


def _item(with_state: bool) -> Schema:
    properties: Schema = {"campaign": _STR, "reservation_id": _STR, "quantity": _INT}
    if with_state:
        properties["state"] = _ITEM_STATES
    return {
        "type": "object",
        "required": ["campaign", "reservation_id", "quantity"],
        "properties": properties,
    }


def cart_schemas() -> dict[str, Schema]:
    order = {
        "type": "object",
        "required": ["id", "cart", "user", "state", "items"],
        "properties": {
            "id": _STR,
            "cart": _STR,
            "user": _STR,
            "state": {"type": "string", "enum": _CART_STATES},
            "mode": _STR,
            "items": {"type": "array", "items": _item(with_state=True)},
            "created_ms": _INT,
            "updated_ms": _INT,
            "deadline_ms": {"type": ["integer", "null"]},
            "hold_until_ms": {"type": ["integer", "null"]},
            "settled": {"type": "boolean", "description": "every item follows the state"},
            "reason": {"type": ["string", "null"]},
            "failed_deliveries": _INT,
        },
        "additionalProperties": True,
        "description": "One order of several items (a cart): its state decides every item.",
    }
    buyer = {
        "type": "object",
        "required": ["reservation_id", "cart", "state", "items", "quantity"],
        "properties": {
            "reservation_id": _STR,
            "cart": _STR,
            "state": {"type": "string", "enum": _CART_STATES},
            "items": {"type": "array", "items": _item(with_state=True)},
            "quantity": _INT,
            "created_ms": _INT,
            "updated_ms": _INT,
            "reason": {"type": ["string", "null"]},
            "reply": {
                "type": "object",
                "required": ["status", "content_type", "body"],
                "properties": {"status": _INT, "content_type": _STR, "body": _STR},
            },
        },
    }

    def flagged(flag: str) -> Schema:
        extra = {"type": "object", "required": [flag], "properties": {flag: {"type": "boolean"}}}
        return {"allOf": [_ref("CartOrder"), extra]}

    return {
        "CartOrder": order,
        "BuyerCartOrder": buyer,
        "CartOrderCancelled": flagged("released_now"),
        "CartOrderConfirmed": flagged("confirmed_now"),
    }


#: Where an answer about a reservation may be about a cart order instead.
EITHER = {
    "BuyerReservation": "BuyerCartOrder",
    "Reservation": "CartOrder",
    "Cancelled": "CartOrderCancelled",
    "Confirmed": "CartOrderConfirmed",
}


def reservation_or_order(name: str) -> Schema:
    """The schema of an answer about a reservation, or about a cart order."""
    return {"oneOf": [_ref(name), _ref(EITHER[name])]}
