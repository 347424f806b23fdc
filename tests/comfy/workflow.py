"""A workflow saved by the ComfyUI frontend (UI format) -> the API-format prompt POST /prompt takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.comfy.errors import ComfyHarnessError

_WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Frontend-only nodes: they never reach the server.
_VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
_MODE_MUTED, _MODE_BYPASSED = 2, 4
_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")


def _input_specs(node_def: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's required then optional inputs, in the frontend's order."""
    specs = []
    order = node_def.get("input_order") or {}
    for group in ("required", "optional"):
        declared = node_def.get("input", {}).get(group) or {}
        for name in order.get(group) or list(declared):
            spec = declared[name]
            specs.append((name, spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}))
    return specs


def _widget_slots(input_type: Any, name: str, options: Mapping[str, Any]) -> int:
    """How many widgets_values entries an input takes in 0.3.75's frontend (1.32.x); 0 if it is only a socket.

    The value itself, then what the frontend adds after it: a "control after generate" combo for an INT
    named seed/noise_seed or flagged control_after_generate; for a flagged COMBO, that combo plus a
    filter-list string; for an upload combo, the upload button's value ("image"). Those extra widgets
    are marked not-to-serialize only in their options, which LiteGraph's saver does not look at.
    """
    if options.get("forceInput"):
        return 0
    is_combo = isinstance(input_type, list) or input_type == "COMBO"
    if not is_combo and input_type not in _WIDGET_TYPES:
        return 0
    slots = 1
    control = options.get("control_after_generate")
    if input_type == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
        slots += 1
    if is_combo and control:
        slots += 2
    if is_combo and any(options.get(flag) for flag in _UPLOAD_FLAGS):
        slots += 1
    return slots


def _combo_choices(input_type: Any, options: Mapping[str, Any]) -> list:
    if isinstance(input_type, list):
        return input_type
    return list(options.get("options") or []) if input_type == "COMBO" else []


def _normalise_links(ui_workflow: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot), from either the array or the object link format."""
    links = {}
    for link in ui_workflow.get("links") or []:
        if isinstance(link, Mapping):
            links[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]))
        else:
            links[int(link[0])] = (int(link[1]), int(link[2]))
    return links


def workflow_to_api(
    ui_workflow: Mapping[str, Any], object_info: Mapping[str, Any], *, strict: bool = False
) -> dict[str, dict]:
    """Convert a workflow saved by the ComfyUI frontend to the API format POST /prompt takes.

    Handles widgets (with the frontend's extra control/upload values), links, muted (dropped) and
    bypassed (wired through) nodes, Reroute, PrimitiveNode and Note nodes. Subgraphs and group nodes
    are not supported. Extensions append display-only widgets (API nodes' status text, 3D previews)
    after the real ones, so extra trailing widgets_values are ignored and missing ones take the input's
    default, as the frontend does; strict=True raises on any count mismatch instead.

    Checked against the 0.3.75 frontend's own graphToPrompt() (headless Chromium) on the 160
    bundled templates this server can load: the same nodes and the same values for every input
    the node declares. Only `_meta.title` can differ (the frontend uses translated display names)
    and the frontend also sends display-only widgets (PreviewAny's "preview"), which the server ignores.
    """
    if (ui_workflow.get("definitions") or {}).get("subgraphs"):
        raise ComfyHarnessError("workflow_to_api does not support subgraphs")
    nodes = {int(node["id"]): node for node in ui_workflow.get("nodes", [])}
    links = _normalise_links(ui_workflow)

    def input_link(node: Mapping[str, Any], index: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    def resolve(link_id: int) -> list | Any | None:
        """The API value a link stands for: [node id, slot], a PrimitiveNode's value, or None (muted)."""
        seen = set()
        while True:
            if link_id in seen:
                raise ComfyHarnessError(f"workflow has a cycle through link {link_id}")
            seen.add(link_id)
            origin_id, origin_slot = links[link_id]
            origin = nodes.get(origin_id)
            if origin is None:
                raise ComfyHarnessError(f"link {link_id} comes from missing node {origin_id}")
            kind, mode = origin.get("type"), origin.get("mode", 0)
            if kind == "PrimitiveNode":
                return ("value", (origin.get("widgets_values") or [None])[0])
            if kind == "Reroute" or mode == _MODE_BYPASSED:
                next_link = (
                    _bypass_input_link(origin, origin_slot) if kind != "Reroute" else input_link(origin, 0)
                )
                if next_link is None:
                    return None
                link_id = next_link
                continue
            if mode == _MODE_MUTED:
                return None
            return ("link", [str(origin_id), origin_slot])

    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        kind, mode = node.get("type"), node.get("mode", 0)
        if kind in _VIRTUAL_NODE_TYPES or mode in (_MODE_MUTED, _MODE_BYPASSED):
            continue
        node_def = object_info.get(kind)
        if node_def is None:
            if not node.get("outputs") and not (node.get("inputs")):
                continue  # a frontend-only decoration
            raise ComfyHarnessError(f"node {node_id} has type {kind!r}, which the server does not list")
        ui_inputs = {slot.get("name"): slot for slot in node.get("inputs") or []}
        widget_values = node.get("widgets_values")
        values_by_name = widget_values if isinstance(widget_values, Mapping) else None
        values = list(widget_values or []) if values_by_name is None else []
        position = 0
        api_inputs: dict[str, Any] = {}
        for name, input_type, options in _input_specs(node_def):
            slots = _widget_slots(input_type, name, options)
            if slots:
                if values_by_name is not None:
                    if name in values_by_name:
                        api_inputs[name] = values_by_name[name]
                elif position < len(values):
                    api_inputs[name] = values[position]
                elif "default" in options:
                    api_inputs[name] = options["default"]
                elif _combo_choices(input_type, options):
                    api_inputs[name] = _combo_choices(input_type, options)[0]  # the frontend's default too
                position += slots
            slot = ui_inputs.get(name)
            if slot is not None and slot.get("link") is not None:
                resolved = resolve(int(slot["link"]))
                if resolved is None:
                    api_inputs.pop(name, None)
                else:
                    api_inputs[name] = resolved[1]
        if strict and values_by_name is None and position != len(values):
            raise ComfyHarnessError(
                f"node {node_id} ({kind}): widgets_values has {len(values)} entries, the node's inputs "
                f"account for {position}: {values!r}"
            )
        prompt[str(node_id)] = {
            "class_type": kind,
            "inputs": api_inputs,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or kind},
        }
    return prompt


def _bypass_input_link(node: Mapping[str, Any], output_slot: int) -> int | None:
    """The input link a bypassed node passes through for output_slot: same slot if the type fits, else first
    of that type."""
    outputs = node.get("outputs") or []
    inputs = node.get("inputs") or []
    wanted = outputs[output_slot].get("type") if output_slot < len(outputs) else None
    if (
        output_slot < len(inputs)
        and inputs[output_slot].get("type") == wanted
        and inputs[output_slot].get("link") is not None
    ):
        return inputs[output_slot]["link"]
    for slot in inputs:
        if slot.get("type") == wanted and slot.get("link") is not None:
            return slot["link"]
    return None
